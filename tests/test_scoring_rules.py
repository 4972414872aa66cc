"""The scoring probe's verdict, and one test per scoring rule through the real training loss.

For each rule sara-moe can align (softmax, sigmoid, probabilities in the slot, a
config-named activation: DeepSeek-V4's sqrt-softplus, and PhiMoE's `softmax_aux`) a tiny model
of a family that routes with it is saved, loaded by `sara train`'s own path, and the SARA loss
and its router gradients are compared with a computation written out here: the rule by hand,
applied to the router output captured by this test's hooks, checked first against the weights
the model dispatches to its experts (for `softmax_aux`, whose dispatch weights are no
distribution, against the experts it dispatches: the top-k in eval mode).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_train import config, first_batch, js_inline

from sara_moe import priors as P
from sara_moe.architectures import find_routers, scoring_verdict
from sara_moe.architectures.families import build_tiny_family, moe_families
from sara_moe.architectures.probe import ScoringProbeError, clear_scoring_cache
from sara_moe.architectures.tiny import build_tiny_model, build_tokenizer
from sara_moe.train import build_trainer

RULE_FAMILY = {"softmax": "qwen3_moe", "sigmoid": "deepseek_v3", "probs": "gemma4_text",
               "sqrtsoftplus": "deepseek_v4", "softmax_aux": "phimoe"}


def rule_by_hand(rule: str, read: torch.Tensor) -> torch.Tensor:
    x = read.float()
    if rule in ("softmax", "softmax_aux"):
        return x.softmax(-1)
    if rule == "probs":
        return x
    x = x.clamp_min(-80)  # scores < 1e-34 either way; avoids sqrt's infinite slope where softplus underflows
    s = torch.sigmoid(x) if rule == "sigmoid" else torch.sqrt(F.softplus(x))
    return s / s.sum(-1, keepdim=True)


@pytest.fixture(scope="module")
def saved_family(tmp_path_factory, example_texts):
    families = {f.model_type: f for f in moe_families()}

    def make(model_type: str):
        out = tmp_path_factory.mktemp(model_type)
        # DeepSeek-V4's own router backward is nan where softplus underflows (logits < -104), which
        # wide random routers on its wide hidden states reach: keep its logits in a realistic range.
        std = 0.05 if model_type == "deepseek_v4" else 1.0
        build_tiny_family(families[model_type], router_std=std).save_pretrained(out)
        build_tokenizer(example_texts, vocab_size=400).save_pretrained(out)
        return out

    return make


def _capture(model, sites):
    """This test's own hooks: each router's read slot (with its graph) and what its experts receive."""
    read, dispatch, handles = {}, {}, []
    for site in sites:
        def out_hook(_m, _i, output, site=site):
            outputs = output if isinstance(output, tuple) else (output,)
            read[site.layer] = outputs[site.logits_index].reshape(-1, outputs[site.logits_index].shape[-1])

        def pre_hook(_m, args, kwargs, site=site):
            tensors = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
            for idx in (t for t in tensors if not t.is_floating_point() and t.dim() == 2):
                weights = [t for t in tensors if t.is_floating_point() and t.shape == idx.shape]
                if weights:
                    dispatch.setdefault(site.layer, (idx.long(), weights[0].detach()))

        handles.append(site.module.register_forward_hook(out_hook))
        handles += [m.register_forward_pre_hook(pre_hook, with_kwargs=True)
                    for m in site.parent.modules() if m is not site.module and m is not site.parent]
    return read, dispatch, handles


@pytest.mark.parametrize("rule", sorted(RULE_FAMILY))
def test_sara_loss_and_router_gradients_use_the_dispatch_rule(rule, saved_family, example_corpus, tmp_path):
    model_dir = saved_family(RULE_FAMILY[rule])
    priors = P.extract_priors(str(model_dir), example_corpus, tmp_path / "p.safetensors", progress=False)
    trainer, _ = build_trainer(config(tmp_path, model_dir, example_corpus, priors, lambda_js=1.0))
    model = trainer.model.eval()
    sites = find_routers(model)
    assert {s.scoring for s in sites} == {rule}
    batch = first_batch(trainer)

    def router_grads(lam: float) -> dict:
        trainer.args.lambda_js = lam
        model.zero_grad()
        trainer.compute_loss(model, dict(batch)).backward()
        return {n: p.grad.clone() for s in sites for n, p in s.module.named_parameters(prefix=s.name)
                if p.grad is not None}

    with_js, without_js = router_grads(1.0), router_grads(0.0)
    js_reported = trainer._metrics["eval"]["js_loss"][-2]  # TRL's per-call buffer; see test_train.first_batch

    read, dispatch, handles = _capture(model, sites)
    model.zero_grad()
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    mask = batch["attention_mask"].float()
    cache = P.load_priors(priors)
    per_layer = []
    for layer in trainer.align_layers:
        dist = rule_by_hand(rule, read[layer])
        idx, weights = dispatch[layer]
        if rule == "softmax_aux":  # the experts dispatched in eval mode are the distribution's top-k
            top = dist.detach().topk(idx.shape[1], -1).indices
            assert torch.equal(idx.sort(-1).values, top.sort(-1).values)
        else:
            picked = dist.detach().double().gather(1, idx)  # the rule is the one the experts are weighted with
            torch.testing.assert_close(picked / picked.sum(-1, keepdim=True),
                                       weights.double() / weights.double().sum(-1, keepdim=True),
                                       atol=2e-5, rtol=1e-4)
        dist = dist.view(*mask.shape, -1)
        pooled = (dist * mask[..., None]).sum(1) / mask.sum(1)[:, None]
        target = cache.table[batch["sara_prior_row"].clamp_min(0), cache.layers.index(layer)]
        per_layer.append(js_inline(pooled, target))
    valid = batch["sara_has_anchor"].float()
    js_by_hand = (torch.stack(per_layer, -1).mean(-1) * valid).sum() / valid.sum()
    js_by_hand.backward()

    js_value = js_by_hand.item()
    assert js_reported == pytest.approx(js_value, rel=1e-4) and js_value > 1e-5
    hand = {n: p.grad for s in sites for n, p in s.module.named_parameters(prefix=s.name) if p.grad is not None}
    assert hand and set(hand) <= set(with_js)
    for name in with_js:  # routers after the aligned band get CE gradient only: zero difference
        grad = hand.get(name, torch.zeros_like(with_js[name]))
        torch.testing.assert_close(with_js[name] - without_js[name], grad, atol=1e-6, rtol=2e-3)
    assert any(g.abs().max() > 1e-6 for g in hand.values())


def test_verdict_is_cached_per_model_type_and_version():
    clear_scoring_cache()
    model = build_tiny_model("deepseek_v3", vocab_size=64)
    verdict = scoring_verdict(model)
    assert verdict.rule == "sigmoid" and verdict.selection_bias and verdict.max_error < 1e-3
    assert verdict.key[0] == "deepseek_v3" and verdict.key[1].endswith("DeepseekV3TopkRouter")
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    assert scoring_verdict(build_tiny_model("deepseek_v3", vocab_size=64, seed=1)) is verdict
    handle.remove()
    assert calls == [] and clear_scoring_cache() == 1  # a second model of the family costs no probe forward


def test_router_that_returns_probabilities_is_read_as_probabilities():
    """transformers 5.0-5.5 Qwen3-MoE put softmax outputs in the logits slot: the probe must notice."""
    clear_scoring_cache()
    model = build_tiny_model("qwen3_moe", vocab_size=64)
    routers = [s.module for s in find_routers(model)]
    clear_scoring_cache()
    handles = [r.register_forward_hook(lambda _m, _i, out: (out[0].softmax(-1), *out[1:])) for r in routers]
    try:
        sites = find_routers(model)
    finally:
        for handle in handles:
            handle.remove()
        clear_scoring_cache()
    assert {s.scoring for s in sites} == {"probs"}


def _probed_with(model, pre_hook):
    clear_scoring_cache()
    handles = [m.register_forward_pre_hook(pre_hook) for n, m in model.named_modules() if n.endswith("mlp.experts")]
    try:
        return scoring_verdict(model)
    finally:
        for handle in handles:
            handle.remove()
        clear_scoring_cache()


def test_dispatch_that_follows_no_rule_is_refused():
    model = build_tiny_model("mixtral", vocab_size=64)

    def flatten_and_swap(_m, args):  # equal weights, and the second pick is not the second-best expert
        hidden, index, weights = args
        second = (index[:, 0] + 4) % 8
        second = torch.where(second == index[:, 1], (index[:, 0] + 5) % 8, second)  # never one of the top-2
        return hidden, torch.stack([index[:, 0], second], -1), torch.full_like(weights, 0.5)

    with pytest.raises(ScoringProbeError, match=r"model_type='mixtral', router class MixtralTopKRouter: .*none"
                                                r".*softmax_aux does not hold .*not the top-k"):
        _probed_with(model, flatten_and_swap)


def test_weights_that_are_no_distribution_are_aligned_through_the_aux_loss():
    """Equal weights for the top-2 follow no rule, but Mixtral's own aux loss still reads the softmax of
    its logits and the experts are still its top-2: the same check as PhiMoE's gives softmax_aux."""
    model = build_tiny_model("mixtral", vocab_size=64)

    def flatten(_m, args):
        hidden, index, weights = args
        return hidden, index, torch.full_like(weights, 0.5)

    verdict = _probed_with(model, flatten)
    assert verdict.rule == "softmax_aux" and "aux_loss" in verdict.evidence and verdict.max_error < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probe_tells_rules_apart_in_half_precision(dtype):
    found = {}
    for arch in ("qwen3_moe", "gpt_oss", "deepseek_v3"):
        clear_scoring_cache()
        found[arch] = scoring_verdict(build_tiny_model(arch, vocab_size=64).to(dtype)).rule
    clear_scoring_cache()
    assert found == {"qwen3_moe": "softmax", "gpt_oss": "softmax", "deepseek_v3": "sigmoid"}


def test_bf16_underflowed_dispatch_weight_does_not_hide_the_rule():
    """Seen on the GPU smoke's random 18-layer Qwen3-MoE in bf16: router logits spanning ~130 give one
    top-k weight that underflows to exactly 0. That weight is consistent with softmax and must not make
    every rule fail; a zero weight where the rule's score is large is still a mismatch."""
    from sara_moe.architectures.probe import rule_error

    logits = torch.tensor([[20.0, 0.0, -110.0, -5.0], [3.0, 2.0, 1.0, 0.0]])
    idx = torch.tensor([[0, 2], [0, 1]])
    probs = torch.softmax(logits.double(), -1).gather(1, idx)
    weights = (probs / probs.sum(-1, keepdim=True)).to(torch.bfloat16)
    assert weights[0, 1] == 0  # exp(-130) underflows in bf16
    assert rule_error(logits.to(torch.bfloat16), idx, weights, "softmax") < 0.01
    assert rule_error(logits.to(torch.bfloat16), idx, weights, "sigmoid") > 1.0
    wrong = weights.clone()
    wrong[1, 1] = 0  # the rule gives this expert 0.27 of the mass: a zero here is no underflow
    assert rule_error(logits.to(torch.bfloat16), idx, wrong, "softmax") == math.inf
