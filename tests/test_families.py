"""Family sweep: every MoE family of the installed transformers, read exactly as it routes.

Marked `families`; `.ci/run` runs it as its own timed step (`pytest -m families`, ~1 min on
one core). Each family's text decoder is built tiny from its default config by the generic
shrinker; the test then captures, with its own hooks, the (indices, weights) every experts
module receives, and checks that sara-moe's distribution (`RouterRecorder.probabilities`,
what analyze/priors/train/steer read) restricted to those experts and renormalised equals the
dispatched weights renormalised. Families aligned as `softmax_aux` (dispatch weights that are
no distribution: PhiMoE's sparsemixer) are checked instead through the model's own aux loss:
it equals the load-balancing loss recomputed here from that distribution and the dispatched
experts, which are its top-k in eval mode. A second test instantiates each default config at full size
on the meta device and checks routers sit exactly in the decoder layers that hold experts.

Families that are not "tested" are listed below with their reason; one that starts to pass
(or a new one that fails) makes the sweep fail, so the lists and docs/architectures.md
(`python scripts/architectures_table.py`) stay true.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from sara_moe.architectures import NotAnMoEModelError, ScoringProbeError, discover_routers, find_routers
from sara_moe.architectures.families import build_tiny_family, expert_count, meta_model, moe_families
from sara_moe.routing import RouterRecorder

pytestmark = pytest.mark.families

FAMILIES = {f.model_type: f for f in moe_families()}

REFUSED = {  # family -> (error, words of its message)
    "doge": (ScoringProbeError, "no dispatch weights"),  # product-key routing, no per-expert score
    "nllb-moe": (NotAnMoEModelError, "encoder-decoder"),
    "switch_transformers": (NotAnMoEModelError, "encoder-decoder"),
}
# transformers' own default config does not build or run a text forward, at full size as shrunk (checked
# with the default's own head geometry and only the expert/layer/vocabulary sizes cut); real checkpoints
# set the missing fields in their config.json and are probed when loaded
UNBUILDABLE = {
    "dbrx": "DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig no longer declares; and "
            "clamps with clip_qkv, None by default",
    "deepseek_ocr2_text": "the decoder indexes mlp_layer_types, None by default and never derived",
    "glm4v_moe_text": "4096 / 96 heads is no integer head width, and its 42 does not fit mrope_section [8, 12, 12]",
    "lfm2_moe": "the decoder indexes layer_types, None by default and never derived",
    "qwen3_omni_moe_text": "2048 / 28 heads is no integer head width: rotary tables of 74 for heads of 73",
    "qwen4_exp_text": "the QSA indexer divides token_budget by indexer_compress_ratio, both None by default",
    "step3p5": "the model always builds a sliding-window mask; sliding_window is None by default (set, it probes "
               "as sigmoid)",
}
# the full-size default config does not build (transformers bugs) or is dense by default
META_UNBUILDABLE = {"dbrx", "dots1", "hunyuan_v1_moe", "lfm2_moe", "qwen4_exp_text", "deepseek_ocr2_text",
                    "diffusion_gemma_text"}
META_DENSE = {"doge", "gemma4_text"}
# Measured independently (issue 11, transformers 5.24; docs/reference/moe-routers.md): these score
# with a sigmoid, and Gemma4-style routers emit probabilities. The probe must find the same.
SIGMOID = {"beam", "dots1", "exaone_moe", "flint", "glm4_moe_lite", "hy_v3", "kolibri1", "minimax_m2",
           "nemotron_h", "solar_open", "deepseek_v3", "glm4_moe", "llama4_text"}
PROBS = {"gemma4_text"}
# Routers that score more slots than the config's routed experts; the aligned distribution covers them all.
# Dispatch weights that are no distribution over experts; aligned as softmax_aux, verified through the aux loss.
SOFTMAX_AUX = {"phimoe"}
EXTRA_SLOTS = {"inkling_text": "shared experts scored as a softmax sink", "longcat_flash": "zero (identity) experts",
               "zaya": "one skip class"}


def _hash_layers(config) -> set[int]:
    """MoE layers that pick experts from the token id (DeepSeek-V4 `hash_moe`): experts, no router."""
    return {i for i, kind in enumerate(getattr(config, "mlp_layer_types", None) or []) if "hash" in str(kind)}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _dispatch_pairs(model: nn.Module, routers):
    """Hooks recording, per decoder layer, what the model hands its experts: `(indices, weights)`."""
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pre_hook(layer):
        def hook(_module, args, kwargs):
            tensors = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
            ints = [t for t in tensors if not t.is_floating_point() and t.dim() == 2]
            for idx in ints:
                weights = [t for t in tensors if t.is_floating_point() and t.shape == idx.shape]
                if weights and layer not in found:
                    found[layer] = (idx.long(), weights[0].detach())
        return hook

    def grouped(layer, output):
        """Routers that return their dispatch grouped by expert (JetMoE: slot order, token of each slot,
        weights, slots per expert): read back through the flat (token, slot) position of each entry."""
        order, weights, sizes = output[0], output[2], output[3]
        k = order.numel() // output[-1].shape[0]
        idx = torch.empty(order.numel(), dtype=torch.long)
        w = torch.empty(order.numel(), dtype=weights.dtype)
        experts = torch.searchsorted(torch.tensor(sizes).cumsum(0), torch.arange(order.numel()), right=True)
        idx[order], w[order] = experts, weights.detach()
        found.setdefault(layer, (idx.view(-1, k), w.view(-1, k)))

    def dense_hook(layer):  # routers that return [N, E] scores, zero off the selected experts (Llama4)
        def hook(_module, _args, output):
            if isinstance(output, tuple) and any(isinstance(t, list) for t in output):
                return grouped(layer, output)
            for t in output if isinstance(output, tuple) else ():
                nonzero = (t != 0).sum(-1) if t.is_floating_point() and t.dim() == 2 else None
                if nonzero is not None and 0 < int(nonzero.max()) < t.shape[-1] and bool((nonzero == nonzero[0]).all()):
                    idx = t.abs().topk(int(nonzero[0]), dim=-1).indices
                    found.setdefault(layer, (idx, t.detach().gather(1, idx)))
        return hook

    handles = []
    for name, module in model.named_modules():
        match = _LAYER.search(name)
        if match and module not in routers:
            handles.append(module.register_forward_pre_hook(pre_hook(int(match.group(1))), with_kwargs=True))
    for site in discover_routers(model):
        handles.append(site.module.register_forward_hook(dense_hook(site.layer)))
    return found, handles


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(REFUSED) - set(UNBUILDABLE)))
def test_family_is_read_as_it_routes(family):
    model = build_tiny_family(FAMILIES[family])
    sites = find_routers(model)
    config = model.config.get_text_config()
    found, handles = _dispatch_pairs(model, {s.module for s in sites})
    ids = torch.randint(4, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    aux = family in SOFTMAX_AUX
    assert (sites[0].scoring == "softmax_aux") == aux, "a family newly aligned through its aux loss: list it"
    try:
        with RouterRecorder(model) as recorder, torch.no_grad():
            extra = {"output_router_logits": True} if aux else {}
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
    finally:
        for handle in handles:
            handle.remove()
    probs = recorder.probabilities(mask)

    routed = sorted(set(found) - _hash_layers(config))
    assert [s.layer for s in sites] == routed, "routers must sit exactly where experts receive routed tokens"
    width = probs[routed[0]].shape[-1]
    assert width == expert_count(config) or (family in EXTRA_SLOTS and width > expert_count(config))
    if aux:  # the model's own aux loss reads this distribution; its eval-mode dispatch is its top-k
        counts, mean_p = torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
        for layer in routed:
            idx, p = found[layer][0], probs[layer].reshape(-1, width).double()
            assert torch.equal(idx.sort(-1).values, p.topk(idx.shape[1], -1).indices.sort(-1).values)
            counts += torch.nn.functional.one_hot(idx, width).sum((0, 1)).double() / (p.shape[0] * len(routed))
            mean_p += p.sum(0) / (p.shape[0] * len(routed))
        assert float(out.aux_loss) == pytest.approx(width * float((counts * mean_p).sum()), rel=1e-5)
        return
    for layer in routed:
        idx, weights = found[layer]
        p = probs[layer].reshape(-1, width).double()
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[0], dtype=torch.float64), atol=1e-5)
        picked, w = p.gather(1, idx), weights.double()
        if idx.shape[1] >= 2:  # the aligned distribution, restricted and renormalised, is what is dispatched
            torch.testing.assert_close(picked / picked.sum(-1, keepdim=True), w / w.sum(-1, keepdim=True),
                                       atol=2e-5, rtol=1e-4)
        else:  # one expert: its weight is a fixed multiple of the aligned probability
            ratio = w / picked
            torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0, 0])), atol=1e-5, rtol=1e-4)
    if family in SIGMOID:
        assert sites[0].scoring == "sigmoid"
    if family in PROBS:
        assert sites[0].scoring == "probs"


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_is_refused_with_its_reason(family):
    if family not in FAMILIES:
        pytest.fail(f"{family} is no longer an MoE family of this transformers; update REFUSED")
    error, words = REFUSED[family]
    model = build_tiny_family(FAMILIES[family])
    with pytest.raises(error, match=words) as info:
        find_routers(model)
    assert FAMILIES[family].model_type in str(info.value)


@pytest.mark.parametrize("family", sorted(UNBUILDABLE))
def test_unbuildable_default_configs_still_fail(family):
    """When transformers fixes one of these, this fails: move the family to the tested sweep."""
    with pytest.raises(Exception) as info:
        find_routers(build_tiny_family(FAMILIES[family]))
    assert not isinstance(info.value, ScoringProbeError) or info.value.__cause__ is not None


def _layers_holding_experts(model: nn.Module, experts: int) -> list[int]:
    """Decoder layers with `experts` experts: a 3-D expert tensor [E, ...] or a list of E expert modules."""
    layers = set()
    for name, module in model.named_modules():
        match = _LAYER.search(name + ".")
        if not match:
            continue
        if isinstance(module, nn.ModuleList) and len(module) == experts and name.endswith("experts"):
            layers.add(int(match.group(1)))
        if any(p.dim() == 3 and p.shape[0] == experts for p in module.parameters(recurse=False)):
            layers.add(int(match.group(1)))
    return sorted(layers)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - META_UNBUILDABLE - set(REFUSED) - META_DENSE))
def test_family_real_shape_on_meta_device(family):
    model = meta_model(FAMILIES[family])
    config = model.config.get_text_config()
    experts = expert_count(config)
    sites = discover_routers(model)
    assert all(p.is_meta for p in model.parameters())
    expected = sorted(set(_layers_holding_experts(model, experts)) - _hash_layers(config))
    assert [s.layer for s in sites] == expected
    for site in sites:
        weight = getattr(site.module, "weight", None)
        if weight is not None and weight.dim() == 2:
            width = weight.shape[0]
            assert width == experts or (family in EXTRA_SLOTS and width > experts), f"{site.name}: width {width}"


@pytest.mark.parametrize("family", sorted(META_DENSE))
def test_dense_default_configs_have_no_router(family):
    with pytest.raises(NotAnMoEModelError, match="no Mixture-of-Experts router"):
        discover_routers(meta_model(FAMILIES[family]))
