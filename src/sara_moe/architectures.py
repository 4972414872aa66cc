"""The one place that knows Mixture-of-Experts architectures.

    from sara_moe.architectures import find_routers
    sites = find_routers(model)          # [RouterSite(layer=3, name=..., scoring="softmax"), ...]

Routers are found through transformers' own registry: every MoE `PreTrainedModel` class lists
its router class under `_can_record_outputs["router_logits"]` (an `OutputRecorder` whose
`index` says which element of the router's output tuple holds the logits). Walking
`model.modules()` finds that class through PEFT wrappers too, so no per-model patching and no
list of module names is needed. What the registry does not say, and this module adds:

- how a router's scores become a distribution over experts (`scoring`): softmax for most
  families; DeepSeek-V3, GLM4-MoE and Llama4 score with a sigmoid, which we normalise
  (`s / s.sum()`); Gemma4-style routers already emit probabilities;
- the true decoder-layer index of each router (dense layers have no router, so MoE layer
  positions and decoder indices differ, e.g. DeepSeek's `first_k_dense_replace`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

# model_type -> how router outputs become a distribution. Anything unlisted is softmax.
SIGMOID_MODEL_TYPES = {"deepseek_v3", "glm4_moe", "glm4v_moe", "llama4", "llama4_text", "kimi_k2"}
PROBABILITY_MODEL_TYPES = {"gemma4", "gemma4_text"}
# Families whose router class the registry does not name; (class name, output index).
FALLBACK_ROUTERS = {"llama4_text": ("Llama4Router", 1), "llama4": ("Llama4Router", 1)}

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")


class NotAnMoEModelError(ValueError):
    """Raised when a model has no router that sara-moe can read."""


@dataclass
class RouterSite:
    """One router: its decoder layer, module path, output slot and scoring rule."""

    layer: int
    name: str
    module: nn.Module
    logits_index: int
    scoring: str  # "softmax" | "sigmoid" | "probs"


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = getattr(model.get_base_model(), "config", None)
    text_config = getattr(config, "text_config", None) if config is not None else None
    return getattr(text_config or config, "model_type", "") or ""


def scoring_rule(model_type: str) -> str:
    """How a router of this family turns its output into a distribution over experts."""
    if model_type in SIGMOID_MODEL_TYPES:
        return "sigmoid"
    if model_type in PROBABILITY_MODEL_TYPES:
        return "probs"
    return "softmax"


def _registered_router_classes(model: nn.Module) -> list[tuple[type, int]]:
    """Router classes named by transformers' `_can_record_outputs` registry in any submodule."""
    found: dict[type, int] = {}
    for module in model.modules():
        registry = getattr(type(module), "_can_record_outputs", None) or {}
        entry = registry.get("router_logits")
        if entry is None:
            continue
        for item in entry if isinstance(entry, (list, tuple)) else [entry]:
            target = getattr(item, "target_class", item)
            index = getattr(item, "index", 0) or 0
            if isinstance(target, type):
                found[target] = index
    return list(found.items())


def find_routers(model: nn.Module) -> list[RouterSite]:
    """All routers of `model` in decoder-layer order; raises NotAnMoEModelError if none."""
    model_type = _model_type(model)
    scoring = scoring_rule(model_type)
    classes = _registered_router_classes(model)
    fallback = FALLBACK_ROUTERS.get(model_type)
    sites: list[RouterSite] = []
    for name, module in model.named_modules():
        index = None
        for cls, cls_index in classes:
            if isinstance(module, cls):
                index = cls_index
                break
        if index is None and fallback and type(module).__name__ == fallback[0]:
            index = fallback[1]
        if index is None:
            continue
        match = None
        for match in _LAYER_RE.finditer(name):
            pass
        if match is None:
            raise NotAnMoEModelError(
                f"router {name!r} of {type(model).__name__} is not inside a numbered decoder layer"
            )
        sites.append(RouterSite(int(match.group(1)), name, module, index, scoring))
    if not sites:
        raise NotAnMoEModelError(
            f"{type(model).__name__} (model_type={model_type!r}) has no Mixture-of-Experts router "
            "that transformers registers under _can_record_outputs['router_logits']; "
            "sara-moe needs an MoE checkpoint (Qwen3-MoE, Mixtral, OLMoE, DeepSeek, GPT-OSS, ...)"
        )
    sites.sort(key=lambda s: s.layer)
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        raise NotAnMoEModelError(f"{type(model).__name__}: more than one router per decoder layer {layers}")
    return sites


def moe_layers(model: nn.Module) -> list[int]:
    """True decoder-layer indices that hold an MoE router (dense layers skipped)."""
    return [s.layer for s in find_routers(model)]


def num_hidden_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    return int(getattr(text_config or config, "num_hidden_layers"))


def to_probabilities(scores: torch.Tensor, scoring: str) -> torch.Tensor:
    """fp32 distribution over experts from a router's raw output `[..., E]`."""
    scores = scores.float()
    if scoring == "softmax":
        return torch.softmax(scores, dim=-1)
    if scoring == "sigmoid":
        s = torch.sigmoid(scores)
        return s / s.sum(dim=-1, keepdim=True)
    if scoring == "probs":
        return scores
    raise ValueError(f"unknown scoring rule {scoring!r}")


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
