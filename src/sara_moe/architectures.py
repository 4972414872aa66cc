"""The one place that knows Mixture-of-Experts architectures.

    from sara_moe.architectures import find_routers
    sites = find_routers(model)          # [RouterSite(layer=3, name=..., scoring="softmax"), ...]
    sites = discover_routers(model)      # same, without the scoring probe (works on the meta device)

Routers are found through transformers' own registry: every MoE `PreTrainedModel` class lists
its router class under `_can_record_outputs["router_logits"]` (an `OutputRecorder` whose
`index` says which element of the router's output tuple holds the logits). Walking
`model.modules()` finds that class through PEFT wrappers too, so no per-model patching and no
list of module names is needed. What the registry does not say, and this module adds:

- the true decoder-layer index of each router (dense layers have no router, so MoE layer
  positions and decoder indices differ, e.g. DeepSeek's `first_k_dense_replace`);
- how a router's output becomes a distribution over experts (`scoring`). This is not a list
  of model types: `architectures_probe.scoring_verdict` runs one short forward of the loaded
  model and keeps the rule (`softmax`, `sigmoid`, an activation the config names such as
  DeepSeek-V4's `sqrtsoftplus`, or `probs` when the slot already holds probabilities) that
  reproduces the weights the MoE blocks actually dispatch to their experts. No rule, no
  numbers: PhiMoE's sparsemixer, product-key routing (Doge), two routers per layer (JetMoE)
  and encoder-decoder models are refused with a one-line error (docs/architectures.md).

What sara-moe aligns, where families differ (one decision, used by analyze, priors, train
and steer through `RouterRecorder.probabilities` -> `to_probabilities`):

- **the distribution** is the router's score over *all routed experts* under the verified
  rule, normalised to sum to 1: softmax(logits), act(logits)/sum for an activation rule,
  the slot itself for `probs`. Restricted to a token's selected experts and renormalised it
  equals the weights the model dispatches (up to a per-token constant such as
  `routed_scaling_factor`), which is what the probe checks.
  Softmax over the selected top-k only (GPT-OSS) is the same distribution restricted.
- **selection-only biases** (DeepSeek-V3-style `e_score_correction_bias`, reported as
  `selection_bias`) change which experts are picked but not the weights they get; the
  aligned distribution is the unbiased score, the one that weights the experts' outputs.
  The bias is a load-balancing device, not the model's preference.
- **shared experts** are always on with a fixed weight, identical for every language: they
  carry no routing signal and are not part of the distribution (it covers routed experts).
  The distribution does cover every slot the router itself scores: where a router scores
  zero/identity experts, a skip class or the shared experts as a softmax sink alongside the
  routed ones (LongCat-Flash, Zaya, Inkling), those slots compete for weight and are kept.
- **hash-routed layers** (DeepSeek-V4 `hash_moe`) pick experts from the token id, with no
  router: like dense layers they have no routing distribution and are not aligned.
- **dense layers** have no router: they are not MoE layers, never listed in `moe_layers`,
  never aligned; layer numbers everywhere are true decoder indices.
- a **multimodal** model is read through its text decoder's routers (the registry names them
  for the text model); a **hybrid** (attention/SSM) model's MoE layers are whichever decoder
  layers hold a router.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures_probe import ScoringProbeError, score  # noqa: F401  (ScoringProbeError is re-exported)
from .architectures_probe import scoring_verdict as probe_scoring


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")


class NotAnMoEModelError(ValueError):
    """Raised when a model has no router that sara-moe can read."""


@dataclass
class RouterSite:
    """One router: its decoder layer, module path, output slot, MoE block and scoring rule."""

    layer: int
    name: str
    module: nn.Module
    logits_index: int
    scoring: str | None  # "softmax" | "sigmoid" | "probs" (None from discover_routers)
    parent: nn.Module | None = field(default=None, repr=False)  # the MoE block the router feeds
    selection_bias: bool = False  # a selection-only bias (e_score_correction_bias) sits on the router


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = getattr(model.get_base_model(), "config", None)
    text_config = getattr(config, "text_config", None) if config is not None else None
    return getattr(text_config or config, "model_type", "") or ""


def router_registry(classes) -> dict[type, int]:
    """Router classes that these model classes register, each with the output index of its scores."""
    found: dict[type, int] = {}
    for cls in classes:
        entry = (getattr(cls, "_can_record_outputs", None) or {}).get("router_logits")
        for item in entry if isinstance(entry, (list, tuple)) else [] if entry is None else [entry]:
            target = getattr(item, "target_class", item)
            if isinstance(target, type):
                found[target] = getattr(item, "index", 0) or 0
    return found


def _registered_router_classes(model: nn.Module) -> list[tuple[type, int]]:
    """Router classes named by transformers' `_can_record_outputs` registry in any submodule."""
    return list(router_registry(dict.fromkeys(type(m) for m in model.modules())).items())


def _moe_block(modules: dict[str, nn.Module], name: str, match: re.Match) -> nn.Module:
    """The decoder layer's child that holds the router (its MoE block), or the layer itself."""
    layer_prefix = name[: match.end()]
    block = layer_prefix + name[match.end():].split(".")[0]
    if block == name or getattr(modules[block], "base_layer", None) is modules[name]:
        return modules[layer_prefix.rstrip(".")]  # router sits directly in the decoder layer (maybe PEFT-wrapped)
    return modules[block]


def discover_routers(model: nn.Module) -> list[RouterSite]:
    """All routers of `model` in decoder-layer order, scoring not yet decided (no forward runs).

    Raises NotAnMoEModelError if there is none. Works on the meta device.
    """
    model_type = _model_type(model)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise NotAnMoEModelError(f"{type(model).__name__} (model_type={model_type!r}) is an encoder-decoder model; "
                                 "sara-moe reads decoder-only MoE language models")
    classes = _registered_router_classes(model)
    modules = dict(model.named_modules())
    sites: list[RouterSite] = []
    for name, module in modules.items():
        index = next((cls_index for cls, cls_index in classes if isinstance(module, cls)), None)
        if index is None:
            continue
        match = None
        for match in _LAYER_RE.finditer(name):
            pass
        if match is None:
            raise NotAnMoEModelError(
                f"router {name!r} of {type(model).__name__} is not inside a numbered decoder layer"
            )
        bias = isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor)
        sites.append(RouterSite(int(match.group(1)), name, module, index, None, _moe_block(modules, name, match), bias))
    if not sites:
        raise NotAnMoEModelError(
            f"{type(model).__name__} (model_type={model_type!r}) has no Mixture-of-Experts router "
            "that transformers registers under _can_record_outputs['router_logits']; "
            "sara-moe needs an MoE checkpoint (Qwen3-MoE, Mixtral, OLMoE, DeepSeek, GPT-OSS, ...)"
        )
    sites.sort(key=lambda s: s.layer)
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        raise NotAnMoEModelError(
            f"{type(model).__name__} (model_type={model_type!r}): more than one registered router per decoder "
            f"layer ({sorted({type(s.module).__name__ for s in sites})} at layers {layers}); sara-moe aligns one "
            "routing distribution per layer and does not support this model"
        )
    return sites


def scoring_verdict(model: nn.Module, sites: list[RouterSite] | None = None):
    """The verified scoring rule of `model` (`architectures_probe.ScoringVerdict`); one probe per process."""
    return probe_scoring(model, sites if sites is not None else discover_routers(model))


def find_routers(model: nn.Module) -> list[RouterSite]:
    """All routers of `model` in decoder-layer order with their verified scoring rule.

    Raises NotAnMoEModelError if there is none and `ScoringProbeError` if the model's dispatch
    weights follow no rule sara-moe can align.
    """
    sites = discover_routers(model)
    rule = scoring_verdict(model, sites).rule
    for site in sites:
        site.scoring = rule
    return sites


def router_weight(site: RouterSite) -> torch.Tensor:
    """The router's `[scores, hidden]` projection (its rows: how many scores it emits), read without a forward.

    A bare `weight` for most routers; a named projection inside others (Gemma4's `proj`); the gate
    of a whole MoE block registered as the router (ERNIE-4.5-VL), skipping its experts.
    """
    weight = getattr(site.module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight
    for name, param in site.module.named_parameters():
        if param.dim() == 2 and "expert" not in name:
            return param
    raise NotAnMoEModelError(f"router {site.name} ({type(site.module).__name__}) has no [experts, hidden] projection")


def moe_layers(model: nn.Module) -> list[int]:
    """True decoder-layer indices that hold an MoE router (dense layers skipped)."""
    return [s.layer for s in discover_routers(model)]


def num_hidden_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    return int(getattr(text_config or config, "num_hidden_layers"))


def to_probabilities(scores: torch.Tensor, scoring: str) -> torch.Tensor:
    """fp32 distribution over routed experts from a router's read slot `[..., E]` (see module docstring)."""
    s = score(scores, scoring)
    return s if scoring in ("softmax", "probs") else s / s.sum(dim=-1, keepdim=True)


def middle_band(model_or_num_layers, moe: list[int]) -> list[int]:
    """Recommended layers to align: the paper's middle band scaled to this depth.

    The paper aligned decoder layers 7-34 of Qwen3-30B-A3B's 48, i.e. layers at relative
    depth 7/48 <= i/L < 35/48. Routing analyses (Bandarkar et al.) find language-specific
    routing in the first and last layers and shared routing in the middle, which is the band
    this rule keeps. Dense layers are dropped; if the band is empty the middle MoE layer is
    returned.
    """
    n = model_or_num_layers if isinstance(model_or_num_layers, int) else num_hidden_layers(model_or_num_layers)
    band = [i for i in moe if 7 * n <= 48 * i < 35 * n]
    return band or [moe[len(moe) // 2]]
