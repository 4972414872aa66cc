"""Router discovery and recording on tiny saved-and-reloaded models of every supported family."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sara_moe.architectures import NotAnMoEModelError, discover_routers, find_routers, middle_band
from sara_moe.architectures.tiny import TINY_ARCHS
from sara_moe.routing import RouterRecorder, position_ids_from_mask

ALL_ARCHS = sorted(TINY_ARCHS)
SIGMOID_ARCHS = {"deepseek_v3", "glm4_moe"}
DENSE_FIRST = {"deepseek_v2", "deepseek_v3", "glm4_moe"}  # first_k_dense_replace=1 in tiny configs


def load(tiny_model_dir, arch, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=dtype).eval()


def batch(vocab=300, lengths=(9, 6), side="right", seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, span] = torch.randint(4, vocab, (n,), generator=gen)
        mask[row, span] = 1
    return ids, mask


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_recorded_probabilities_match_output_router_logits(tiny_model_dir, arch):
    model = load(tiny_model_dir, arch)
    layers = [site.layer for site in discover_routers(model)]
    expected_layers = [1, 2, 3] if arch in DENSE_FIRST else [0, 1, 2, 3]
    assert layers == expected_layers
    ids, mask = batch()
    with RouterRecorder(model) as rec:
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    probs = rec.probabilities(mask)
    assert list(probs) == expected_layers and len(out.router_logits) == len(expected_layers)
    real = mask.bool()
    for layer, logits in zip(expected_layers, out.router_logits):
        logits = logits.float().view(*ids.shape, -1)
        # raw logits, not probabilities (guards against transformers #45120-style regressions)
        assert not torch.allclose(logits[real].sum(-1), torch.ones(int(real.sum())), atol=1e-3)
        if arch in SIGMOID_ARCHS:
            s = torch.sigmoid(logits)
            expected = s / s.sum(-1, keepdim=True)
        else:
            expected = torch.softmax(logits, -1)
        got = probs[layer]
        assert got.dtype == torch.float32 and got.shape == (*ids.shape, 8)
        torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[real].sum(-1), torch.ones(int(real.sum())), rtol=0, atol=1e-5)
        assert got[~real].abs().max() == 0


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_gradients_reach_router_weights(tiny_model_dir, arch):
    model = load(tiny_model_dir, arch)
    ids, mask = batch()
    with RouterRecorder(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    probs = rec.probabilities(mask)
    loss = sum((p.sum(1) ** 2).sum() for p in probs.values())
    loss.backward()
    for site in find_routers(model):
        assert site.module.weight.grad is not None and site.module.weight.grad.abs().sum() > 0, site.name


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_padding_either_side_matches_unpadded(tiny_model_dir, arch, side):
    model = load(tiny_model_dir, arch)
    ids, mask = batch(lengths=(9, 5), side=side)
    with RouterRecorder(model) as rec:
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    padded = rec.probabilities(mask)
    short = ids[1][mask[1].bool()].unsqueeze(0)
    with RouterRecorder(model) as rec:
        model(input_ids=short, attention_mask=torch.ones_like(short))
    alone = rec.probabilities(torch.ones_like(short))
    for layer in padded:
        torch.testing.assert_close(padded[layer][1][mask[1].bool()], alone[layer][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_checkpoint_recompute_is_ignored_and_gradients_match(tiny_model_dir, arch):
    grads, calls = [], []
    for checkpointing in (False, True):
        model = load(tiny_model_dir, arch)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        router = find_routers(model)[-1].module
        fired = []
        handle = router.register_forward_hook(lambda *a: fired.append(1))
        ids, mask = batch()
        with RouterRecorder(model) as rec:
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
            probs = rec.probabilities(mask)
            recorded = dict(rec.scores)
            loss = out.loss + sum((p.sum(1) ** 2).mean() for p in probs.values())
            loss.backward()  # recompute happens here, inside the open recorder
            assert all(rec.scores[layer] is recorded[layer] for layer in recorded)  # recompute not recorded
        handle.remove()
        calls.append(len(fired))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert calls == [1, 2]  # the router really fired again during the recompute
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_peft_lora_on_router_is_recorded(tiny_model_dir, arch):
    from peft import LoraConfig, get_peft_model

    model = load(tiny_model_dir, arch)
    ids, mask = batch()
    with RouterRecorder(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    base = rec.probabilities(mask)
    router_param = find_routers(model)[0].name.split(".")[-1] + ".weight"  # gate.weight / router.weight
    peft_model = get_peft_model(model, LoraConfig(r=2, target_parameters=[f"mlp.{router_param}"],
                                                  init_lora_weights=False))
    sites = find_routers(peft_model)
    assert [s.layer for s in sites] == list(base)
    with RouterRecorder(peft_model) as rec:
        peft_model(input_ids=ids, attention_mask=mask)
    lora = rec.probabilities(mask)
    layer = next(iter(lora))
    assert not torch.allclose(lora[layer], base[layer], atol=1e-4)  # the LoRA delta is in the logits
    sum((p.sum(1) ** 2).sum() for p in lora.values()).backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n and p.requires_grad]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe", "deepseek_v3"])
def test_bf16_model_gives_fp32_distributions(tiny_model_dir, arch):
    model = load(tiny_model_dir, arch, dtype=torch.bfloat16)
    ids, mask = batch()
    with RouterRecorder(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    for p in rec.probabilities(mask).values():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p[mask.bool()].sum(-1), torch.ones(int(mask.sum())), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_topk_view_is_renormalised_selected_weights(tiny_model_dir, arch):
    model = load(tiny_model_dir, arch)
    ids, mask = batch()
    with RouterRecorder(model, keep_topk=True) as rec:
        model(input_ids=ids, attention_mask=mask)
    dense = rec.probabilities(mask)
    for layer, view in rec.topk_probabilities(mask).items():
        real = view[mask.bool()]
        torch.testing.assert_close(real.sum(-1), torch.ones(real.shape[0]), rtol=0, atol=1e-5)
        assert ((real > 0).sum(-1) <= 2).all()
        if arch not in SIGMOID_ARCHS | {"deepseek_v2"}:  # plain top-k of the softmax
            top2 = dense[layer][mask.bool()].topk(2, -1).indices.sort(-1).values
            assert torch.equal((real > 0).nonzero()[:, 1].view(-1, 2), top2)


def test_layer_selection_and_errors(tiny_model_dir):
    model = load(tiny_model_dir, "deepseek_v3")
    assert RouterRecorder(model, layers=[2, 3]).layers == [2, 3]
    with pytest.raises(ValueError, match=r"layers \[0\] hold no MoE router; MoE layers are \[1, 2, 3\]"):
        RouterRecorder(model, layers=[0, 2])
    rec = RouterRecorder(model)
    with pytest.raises(RuntimeError, match="did not fire"):
        rec.probabilities(torch.ones(1, 3))


def test_non_moe_model_is_rejected_by_class_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(NotAnMoEModelError, match="LlamaForCausalLM .*has no Mixture-of-Experts router"):
        find_routers(model)


def test_middle_band_reproduces_the_paper_band():
    assert middle_band(48, list(range(48))) == list(range(7, 35))
    assert middle_band(4, [0, 1, 2, 3]) == [1, 2]
    assert middle_band(4, [3]) == [3]  # empty band falls back to the middle MoE layer
