"""Router discovery and recording on tiny saved-and-reloaded models of every supported family."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sara_moe.architectures import NotAnMoEModelError, discover_routers, find_routers, middle_band, router_weight
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
    router_logits = out.router_logits
    if arch == "jetmoe":  # per layer: attention-head router, the attention module passing it on, MLP router
        assert len(router_logits) == 3 * len(expected_layers)
        torch.testing.assert_close(router_logits[0::3], router_logits[1::3], rtol=0, atol=0)
        router_logits = router_logits[2::3]
    assert list(probs) == expected_layers and len(router_logits) == len(expected_layers)
    real = mask.bool()
    for layer, logits in zip(expected_layers, router_logits):
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
        weight = router_weight(site)  # the router's projection (JetMoE keeps it one module down)
        assert weight.grad is not None and weight.grad.abs().sum() > 0, site.name


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


def segments_of(mask: torch.Tensor) -> torch.Tensor:
    """Example index per token of a padded batch (one example per row), -1 on pads."""
    rows = torch.arange(mask.shape[0]).unsqueeze(-1).expand_as(mask)
    return torch.where(mask.bool(), rows, -1)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_pooled_by_segment_equals_masked_mean_and_its_gradient(tiny_model_dir, arch):
    """The memory-lean pooling (logits saved, distribution recomputed in backward) gives the plain
    expression's values and router gradients; a segment spanning two rows and an empty one included."""
    model = load(tiny_model_dir, arch).train()
    ids, mask = batch(lengths=(9, 6, 4))
    segments = segments_of(mask)
    segments[2][segments[2] >= 0] = 0  # row 2 belongs to example 0 too: one example, two pieces
    rec = RouterRecorder(model)
    results = {}
    for way in ("lean", "plain"):
        model.zero_grad()
        with rec:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        if way == "lean":
            pooled = rec.pooled_by_segment(segments, 3)
        else:
            probs = rec.probabilities(mask)
            per_example = []
            for example in range(3):
                keep = (segments == example).float().unsqueeze(-1)
                per_example.append(torch.stack([(probs[layer] * keep).sum((0, 1)) / keep.sum().clamp_min(1)
                                                for layer in rec.layers]))
            pooled = torch.stack(per_example)
        (pooled * torch.linspace(0.5, 2.0, pooled.shape[-1])).sum().backward()
        results[way] = (pooled.detach(), [s.module.weight.grad.clone() for s in rec.sites])
    assert torch.allclose(results["lean"][0], results["plain"][0], rtol=1e-6, atol=1e-7)
    assert results["lean"][0][1].sum(-1).allclose(torch.ones(len(rec.layers)), atol=1e-5)
    assert torch.equal(results["lean"][0][2], torch.zeros_like(results["lean"][0][2]))  # no token: zeros
    for lean, plain in zip(results["lean"][1], results["plain"][1]):
        assert torch.allclose(lean, plain, rtol=1e-5, atol=1e-7) and plain.abs().max() > 0


def test_pooled_by_segment_saves_only_the_router_logits(tiny_model_dir):
    """Per token and layer, backward keeps the router's logits (its own output) and two small per-token
    vectors, not an fp32 copy of the distribution: counted by saved_tensors_hooks."""
    model = load(tiny_model_dir, "qwen3_moe").train()
    ids, mask = batch(lengths=(9, 6))
    tokens, experts = ids.numel(), model.config.num_experts
    rec = RouterRecorder(model)
    with rec:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rec.pooled_by_segment(segments_of(mask), 2)
    logits = {s.layer: rec.scores[s.layer].data_ptr() for s in rec.sites}
    assert len(saved) == 3 * len(rec.sites)
    assert sorted(t.data_ptr() for t in saved if t.shape == (tokens, experts)) == sorted(logits.values())
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in logits.values())
    assert extra == len(rec.sites) * tokens * (8 + 4)  # segment index (int64) + weight (fp32) per token
    plain = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain.append(t) or t, lambda t: t):
        probs = rec.probabilities(mask)
        [(p * mask.unsqueeze(-1)).sum(1) for p in probs.values()]
    fp32_copies = [t for t in plain if t.shape[-1] == experts and t.dtype == torch.float32
                   and t.data_ptr() not in logits.values()]
    assert len(fp32_copies) >= len(rec.sites)  # the plain expression keeps a distribution per layer


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_early_exit_forward_records_the_full_forwards_scores(tiny_model_dir, arch):
    from sara_moe.routing import routing_forward

    model = load(tiny_model_dir, arch)
    ids, mask = batch()
    layers = [site.layer for site in discover_routers(model)][:2]
    rec = RouterRecorder(model, layers)
    with torch.no_grad():
        routing_forward(model, rec, ids, mask, early_exit=False)
        full = {layer: t.clone() for layer, t in rec.scores.items()}
        ran = []
        handle = model.get_output_embeddings().register_forward_hook(lambda *_: ran.append("head"))
        routing_forward(model, rec, ids, mask, early_exit=True)
        handle.remove()
    assert ran == [] and sorted(rec.scores) == sorted(full) == layers
    for layer in layers:
        assert torch.equal(rec.scores[layer], full[layer]), layer
