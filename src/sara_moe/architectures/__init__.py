"""The one place that knows Mixture-of-Experts architectures.

    from sara_moe.architectures import find_routers
    sites = find_routers(model)          # [RouterSite(layer=3, name=..., scoring="softmax"), ...]
    sites = discover_routers(model)      # same, without the scoring probe (works on the meta device)
    layers = resolve_layer_spec(model, "7-34", field_name="field align_layers")   # the one layer-spec parser
    k, targets = experts_per_token(model), lora_targets(model)                      # per-family facts

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
  reproduces the weights the MoE blocks actually dispatch to their experts. Where the dispatch
  weights follow no rule but the model's own load-balancing loss reads the softmax of the
  logits, and the eval-mode dispatch is that softmax's top-k, the rule is `softmax_aux`
  (PhiMoE's sparsemixer; verified through the model's `aux_loss`, see `probe`). No rule, no
  numbers: product-key routing (Doge) and encoder-decoder models are refused with a one-line
  error (docs/architectures.md);
- which router a layer aligns where it has more than one (JetMoE routes its attention heads and
  its MLP experts): the **router site**, a path inside the decoder layer (`mlp.router`). The
  family default is the MLP-expert router (`DEFAULT_ROUTER_SITE`); `set_router_site` (the
  `router_site` field of analyze, priors, train, eval and steer) picks another, and
  `router_site_names` lists them (`sara analyze` reports each).

What sara-moe aligns, where families differ (one decision, used by analyze, priors, train
and steer through `RouterRecorder.probabilities` -> `to_probabilities`):

- **the distribution** is the router's score over *all routed experts* under the verified
  rule, normalised to sum to 1: softmax(logits), act(logits)/sum for an activation rule,
  the slot itself for `probs`. Restricted to a token's selected experts and renormalised it
  equals the weights the model dispatches (up to a per-token constant such as
  `routed_scaling_factor`), which is what the probe checks. `softmax_aux` aligns softmax(logits),
  the distribution the model's own load-balancing loss reads, whose top-k it dispatches in eval
  mode; its dispatch weights are not that restriction (what training mode sees: `probe`).
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

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sara_moe.architectures.probe import DISTRIBUTION_RULES, ScoringProbeError, model_source, score  # noqa: F401  (re-exported)
from sara_moe.architectures.probe import scoring_verdict as probe_scoring

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
    scoring: str | None  # "softmax" | "sigmoid" | "probs" | "softmax_aux" | ... (None from discover_routers)
    parent: nn.Module | None = field(default=None, repr=False)  # the MoE block the router feeds
    selection_bias: bool = False  # a selection-only bias (e_score_correction_bias) sits on the router
    site: str = ""  # its path inside the decoder layer, e.g. "mlp.gate" (the same in every layer)


# Families whose decoder layers hold more than one router, and the one aligned unless `router_site`
# says otherwise: the router of the MLP experts, the experts whose language routing SARA aligns
# (JetMoE's other router, self_attention.experts.router, picks attention heads).
DEFAULT_ROUTER_SITE = {"jetmoe": "mlp.router"}
ROUTER_SITE_ATTR = "sara_router_site"  # where set_router_site keeps the choice on the model object


def model_config(model: nn.Module):
    """The model's config, through a PEFT wrapper too (the one place that unwraps PEFT for it)."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = getattr(model.get_base_model(), "config", None)
    return config


def text_config(model: nn.Module):
    """The config of the text decoder (a multimodal model's routers live there), else the config."""
    config = model_config(model)
    return getattr(config, "text_config", None) or config


def _model_type(model: nn.Module) -> str:
    return getattr(text_config(model), "model_type", "") or ""


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


def _all_router_sites(model: nn.Module) -> list[RouterSite]:
    """Every router of `model` (all sites), in module order; refusals as `discover_routers` says."""
    model_type = _model_type(model)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise NotAnMoEModelError(f"{model_source(model)} (model_type={model_type!r}) is an encoder-decoder model; "
                                 "sara-moe reads decoder-only MoE language models: give a ...ForCausalLM checkpoint")
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
                f"{model_source(model)}: router {name!r} is not inside a numbered decoder layer, so sara-moe "
                "cannot tell which layer it routes (docs/architectures.md lists the families it aligns)"
            )
        bias = isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor)
        sites.append(RouterSite(int(match.group(1)), name, module, index, None, _moe_block(modules, name, match),
                                bias, name[match.end():]))
    if not sites:
        raise NotAnMoEModelError(
            f"{model_source(model)} (model_type={model_type!r}) has no Mixture-of-Experts router "
            "that transformers registers under _can_record_outputs['router_logits']; "
            "sara-moe needs an MoE checkpoint (Qwen3-MoE, Mixtral, OLMoE, DeepSeek, GPT-OSS, ...)"
        )
    # A registered module that holds another registered router passes that router's scores on
    # (JetMoeAttention returns its experts' router logits): the inner module is the router.
    names = [s.name for s in sites]
    return [s for s in sites if not any(other.startswith(s.name + ".") for other in names)]


def router_site_names(model: nn.Module) -> list[str]:
    """The router sites of `model` (paths inside a decoder layer, e.g. `mlp.router`): one for most families."""
    return list(dict.fromkeys(s.site for s in _all_router_sites(model)))


def set_router_site(model: nn.Module, site: str | None) -> None:
    """Align the routers at `site` (a path inside the decoder layer); None keeps the family default."""
    if site is not None:
        discover_routers(model, site)  # refuses a site the model lacks
    setattr(model, ROUTER_SITE_ATTR, site)


def discover_routers(model: nn.Module, site: str | None = None) -> list[RouterSite]:
    """The routers of `model` that sara-moe aligns, one per MoE decoder layer in layer order, scoring
    not yet decided (no forward runs): where a layer holds several, those at `site`, else at the
    model's router site (`set_router_site`), else at the family default.

    Raises NotAnMoEModelError if there is none. Works on the meta device.
    """
    model_type = _model_type(model)
    sites = _all_router_sites(model)
    names = list(dict.fromkeys(s.site for s in sites))
    if site is not None and site not in names:
        raise NotAnMoEModelError(f"router_site {site!r}: {model_source(model)} has no router there; its router "
                                 f"sites are {names}")
    chosen = site if site is not None else getattr(model, ROUTER_SITE_ATTR, None)
    if chosen is None and len(names) > 1:
        chosen = DEFAULT_ROUTER_SITE.get(model_type)
    if chosen is not None:
        sites = [s for s in sites if s.site == chosen]
    layers = [s.layer for s in sites]
    if not sites or len(set(layers)) != len(layers):
        raise NotAnMoEModelError(
            f"{model_source(model)} (model_type={model_type!r}): more than one registered router per decoder "
            f"layer ({sorted({type(s.module).__name__ for s in sites})} at sites {names}); sara-moe aligns one "
            "routing distribution per layer: set router_site to one of them"
        )
    sites.sort(key=lambda s: s.layer)
    return sites


def scoring_verdict(model: nn.Module, sites: list[RouterSite] | None = None):
    """The verified scoring rule of `model` (`architectures_probe.ScoringVerdict`); one probe per process."""
    return probe_scoring(model, sites if sites is not None else discover_routers(model))


def find_routers(model: nn.Module, site: str | None = None) -> list[RouterSite]:
    """The routers `discover_routers` picks, with their verified scoring rule.

    Raises NotAnMoEModelError if there is none and `ScoringProbeError` if the model's dispatch
    weights follow no rule sara-moe can align.
    """
    sites = discover_routers(model, site)
    rule = scoring_verdict(model, sites).rule
    for site in sites:
        site.scoring = rule
    return sites


def moe_block_classes(model: nn.Module) -> list[type]:
    """Classes of the modules the routers feed (`RouterSite.parent`: the sparse MoE block, e.g.
    Qwen3MoeSparseMoeBlock, or the decoder layer where the router sits in it), through PEFT too."""
    return list(dict.fromkeys(type(site.parent) for site in discover_routers(model)))


def mark_zero3_leaf_modules(model: nn.Module) -> list[str]:
    """Make every MoE block a DeepSpeed ZeRO-3 leaf (its experts gathered as one), else ranks whose
    tokens skip an expert never fetch its parameters and the others wait forever. Returns the class names."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = moe_block_classes(model)
    set_z3_leaf_modules(model, classes)
    return [cls.__name__ for cls in classes]


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


def num_hidden_layers(model: nn.Module) -> int:
    return int(getattr(text_config(model), "num_hidden_layers"))


# how families name "experts per token" in their configs, most common first
_EXPERTS_PER_TOKEN_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_top_k", "top_k_experts", "moe_k",
                             "num_experts_per_token", "top_k")


def experts_per_token(model: nn.Module) -> int:
    """How many routed experts each token is dispatched to, as the config declares it.

    A config that declares none gets 2 (Mixtral's and most families' value): the registry does
    not say, and the number only sets the default width of top-k statistics.
    """
    config = text_config(model)
    for name in _EXPERTS_PER_TOKEN_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 2


def expose_num_experts(model: nn.Module) -> None:
    """Set `config.num_experts` where a family names the expert count only `num_local_experts`
    (PhiMoE): TRL's loss reads `num_experts` to compute the load-balancing term."""
    config = text_config(model)
    if not hasattr(config, "num_experts") and hasattr(config, "num_local_experts"):
        config.num_experts = config.num_local_experts


def _in_layer_name(name: str) -> tuple[int, str] | None:
    """`model.layers.3.mlp.gate` -> (3, "mlp.gate"): the decoder layer and the name inside it."""
    match = None
    for match in _LAYER_RE.finditer(name):
        pass
    return (int(match.group(1)), name[match.end():]) if match else None


def lora_targets(model: nn.Module) -> dict[str, list[str]]:
    """Names PEFT's LoraConfig needs, per part: `attention` (Linear module names, for
    target_modules), `experts` (fused 3-D expert parameters of MoE layers) and `routers` (each
    router's `[scores, hidden]` projection, `router_weight`), the last two for target_parameters.
    Names are relative to the decoder layer, so one entry covers every layer."""
    sites = discover_routers(model)
    moe = {s.layer for s in sites}
    routers = set()
    for site in sites:
        weight = router_weight(site)
        param = next(n for n, p in site.module.named_parameters() if p is weight)
        routers.add(f"{_in_layer_name(site.name)[1]}.{param}")
    experts = set()
    for name, param in model.named_parameters():
        where = _in_layer_name(name)
        if where and where[0] in moe and ".experts." in name and param.dim() == 3:
            experts.add(where[1])
    attention = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and ".self_attn." in name}
    return {"attention": sorted(attention), "experts": sorted(experts), "routers": sorted(routers)}


def to_probabilities(scores: torch.Tensor, scoring: str) -> torch.Tensor:
    """fp32 distribution over routed experts from a router's read slot `[..., E]` (see module docstring)."""
    s = score(scores, scoring)
    return s if scoring in DISTRIBUTION_RULES else s / s.sum(dim=-1, keepdim=True)


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


# ----------------------------------------------------------------------------- layer specs

LAYER_SPEC_HELP = ("auto | middle | a range 7-34 | a list 3,5,7 (ranges allowed in it: 3,5-7) | "
                   "negative = from the end (-1 = last decoder layer)")
_RANGE_RE = re.compile(r"^(-?\d+)\s*-\s*(-?\d+)$")


class LayerSpecError(ValueError):
    """A layer spec that names no usable MoE layer; the message is one line and names the field."""


def layer_spec_items(spec, field_name: str = "layers") -> list:
    """A layer spec as the list of its items (`"3,5-7"` -> `["3", "5-7"]`, `7` -> `[7]`): the form a
    config keeps; what the items mean needs the model and is `parse_layer_spec`'s job."""
    parts = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    items = []
    for part in parts:
        if isinstance(part, int) and not isinstance(part, bool):
            items.append(part)
        elif isinstance(part, str):
            items += [x.strip() for x in part.strip().strip("[]").split(",") if x.strip()]
        else:
            raise LayerSpecError(f"{field_name}: {part!r} is not a layer spec; give {LAYER_SPEC_HELP}")
    if not items:
        raise LayerSpecError(f"{field_name}: empty layer spec; give {LAYER_SPEC_HELP}")
    return items


def _recommended_layers(analysis, field_name: str) -> list[int]:
    if isinstance(analysis, dict):
        data, where = analysis, "analysis"
    else:
        where = str(analysis)
        try:
            data = json.loads(Path(analysis).read_text())
        except (OSError, ValueError) as err:
            raise LayerSpecError(f"{field_name}: auto cannot read {where} ({err}); fix the analysis path "
                                 "or give layers explicitly") from None
    layers = data.get("recommended_layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not layers:
        raise LayerSpecError(f"{field_name}: auto needs recommended_layers in {where}; rerun `sara analyze` "
                             "or give layers explicitly")
    return layers


def parse_layer_spec(spec, moe_layers: list[int], num_layers: int, analysis=None,
                     field_name: str = "layers") -> list[int]:
    """The sorted decoder-layer indices that a layer spec names; the one parser of layer specs.

    `moe_layers` are the decoder indices that hold a router, `num_layers` the decoder depth.
    - `"auto"` (or None): `analysis`'s `recommended_layers` (an analysis.json path or its dict)
      when given, else `middle_band`; `"middle"`: always `middle_band` (the paper's band).
    - `"7-34"`: the MoE layers in that inclusive range; dense layers inside a range are skipped
      (on first-k-dense or interleaved models a band always spans some), but the range must hold
      at least one MoE layer and both ends must be decoder layers.
    - `"3,5,7"`, `[3, 5, 7]` (a YAML/Python list) or `7`: exactly these layers; each must be an
      MoE layer (a dense one is an error). Items of a list may be ranges: `"3,5-7"`.
    - a negative index counts decoder layers from the end, as in Python: `-1` is layer
      `num_layers - 1` (`"-4--1"` the last four decoder layers).
    Anything else, an empty spec, a layer beyond the model, a reversed range or a dense layer
    raises LayerSpecError (one line, starting with `field_name`).
    """
    moe = sorted(moe_layers)
    where = f"MoE layers are {layer_runs(moe)} of {num_layers} decoder layers"
    items = None if spec is None else layer_spec_items(spec, field_name)
    word = items[0].lower() if items and len(items) == 1 and isinstance(items[0], str) else None
    if items is None or word == "auto":
        chosen = [_index(x, num_layers, field_name, where) for x in _recommended_layers(analysis, field_name)] \
            if analysis is not None else middle_band(num_layers, moe)
        return _only_moe(chosen, moe, field_name, where)
    if word == "middle":
        return middle_band(num_layers, moe)
    chosen: list[int] = []
    singles: list[int] = []
    for item in items:
        match = _RANGE_RE.match(item) if isinstance(item, str) else None
        if match:
            low, high = (_index(x, num_layers, field_name, where) for x in match.groups())
            if low > high:
                raise LayerSpecError(f"{field_name}: range {item!r} runs backwards (layers {low} to {high}); "
                                     "write the lower layer first")
            band = [layer for layer in moe if low <= layer <= high]
            if not band:
                raise LayerSpecError(f"{field_name}: range {item!r} holds no MoE layer; {where}")
            chosen += band
        else:
            singles.append(_index(item, num_layers, field_name, where))
    return sorted(set(chosen + _only_moe(singles, moe, field_name, where)))


def layer_runs(layers: list[int]) -> str:
    """`[1, 2, 3, 5]` -> `"1-3,5"`: a list of layers written as the spec that names it."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def _index(item, num_layers: int, field_name: str, where: str) -> int:
    """A decoder index from an int or digit string; negatives count from the end."""
    if isinstance(item, bool) or not isinstance(item, (int, str)):
        raise LayerSpecError(f"{field_name}: {item!r} is not a layer; give {LAYER_SPEC_HELP}")
    try:
        value = int(item)
    except ValueError:
        raise LayerSpecError(f"{field_name}: {item!r} is not a layer; give {LAYER_SPEC_HELP}") from None
    layer = value + num_layers if value < 0 else value
    if not 0 <= layer < num_layers:
        raise LayerSpecError(f"{field_name}: layer {value} is out of range; the model has decoder layers "
                             f"0..{num_layers - 1} (-{num_layers}..-1 from the end); {where}")
    return layer


def _only_moe(layers: list[int], moe: list[int], field_name: str, where: str) -> list[int]:
    dense = sorted({layer for layer in layers if layer not in moe})
    if dense:
        raise LayerSpecError(f"{field_name}: layer(s) {dense} are dense (no router) and cannot be aligned or "
                             f"steered; {where}")
    return sorted(set(layers))


def resolve_layer_spec(model: nn.Module, spec, analysis=None, field_name: str = "layers") -> list[int]:
    """`parse_layer_spec` against `model`'s routers and depth (works on the meta device)."""
    return parse_layer_spec(spec, [s.layer for s in discover_routers(model)], num_hidden_layers(model),
                            analysis, field_name)
