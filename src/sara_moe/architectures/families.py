"""Every MoE family the installed transformers ships, and a tiny random model of each.

    from sara_moe.architectures.families import moe_families, shrink_config, build_tiny_family
    fams = moe_families()                      # [Family(model_type="qwen3_moe", ...), ...]
    model = build_tiny_family(fams[0], seed=0) # random-init, a few hundred kB

Used by the family sweep (`tests/test_families.py`) and by `scripts/architectures_table.py`,
which writes `docs/architectures.md`. A family is a modeling module of transformers that
registers a router under `_can_record_outputs["router_logits"]`; it is built through its
text decoder (the causal-LM class of the text config, else its base text model), so
multimodal MoE models are covered by the part that routes. Nothing here knows a family:
`shrink_config` caps sizes by what config fields are called, for any config class.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_LAYERS = 4
# (field-name pattern, cap): a sized int field becomes min(its default, cap), an unset one the
# cap; a negative cap is set exactly (expert counts: some defaults have 1 expert or none set).
# The hidden size is then re-derived as heads x the default head width (rotary sections and
# latent-attention splits are sized per head), so head dimensions are never capped.
_TOPK_FIELD = r"per_tok|top_?k$|^moe_k$|moe_topk|top_k_experts|moe_top_k"
_CAPS = [
    (r"vocab_size$", 512),
    (r"^(hidden_size|d_model|text_hidden_size|router_hidden_size)$", 64),
    (r"heads", 4),
    (r"(lora_rank|_rank)$", 16),
    (r"shared_experts?$|num_shared_experts|moe_num_shared_experts", 1),
    (_TOPK_FIELD, 2),
    (r"^n_group$|^num_expert_group$", 2),
    (r"topk_group", 1),
    (r"^n_groups$|mamba_n_groups", 1),
    (r"experts$|^num_experts|^n_routed_experts|moe_num_experts", -8),
    (r"intermediate|ffn|mlp_dim|moe_hidden_size|expert_dim|share_expert_dim|latent_size", 32),
    (r"max_position_embeddings|max_seq_len", 512),
    (r"layer_period|layer_step|sparse_step|layer_interval|layer_freq", 2),
    (r"first_k_dense|num_dense_layers|layer_offset|layer_start_index|_layers$", 1),
]
_SKIP = re.compile(r"^index_|indexer|token_id|token_index|_id$|initializer|eps|dropout|factor|alpha|beta|scale"
                   r"|theta|bias|window|chunk|block_size|kernel|conv|num_hidden_layers|per_layer_input"
                   r"|vocab_size_per|head_dim|d_head")
_HEAD_DIM = re.compile(r"^head_dim$")  # kept at the default's value, derived or not
_MOE_SWITCH = re.compile(r"^((is|use|enable)_)?moe(_block|_layers?)?$")  # turns MoE on where the default is dense


@dataclass(frozen=True)
class Family:
    model_type: str  # of the text config that is built
    config_class: type
    model_class: type
    router_classes: tuple[str, ...]  # as registered, for the table
    multimodal: bool  # the text decoder of a vision-language (or omni) config


def _router_modules() -> list[str]:
    """Modeling modules whose source registers `router_logits` (read as text: importing all is slow)."""
    import transformers

    root = Path(transformers.__file__).parent / "models"
    names = []
    for path in sorted(root.glob("*/modeling_*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        if '"router_logits"' in text and "_can_record_outputs" in text:
            names.append(f"transformers.models.{path.parent.name}.{path.stem}")
    return names


def _registered(module) -> tuple[str, ...]:
    from sara_moe.architectures import router_registry

    return tuple(c.__name__ for c in router_registry(o for o in vars(module).values() if isinstance(o, type)))


def _text_model_class(module, text_config_cls) -> type | None:
    """The module's model class for `text_config_cls`: a causal LM if there is one, else a base model."""
    from transformers import PreTrainedModel

    found = [obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, PreTrainedModel)
             and getattr(obj, "config_class", None) is text_config_cls and obj.__module__ == module.__name__]
    found.sort(key=lambda c: (not c.__name__.endswith("ForCausalLM"), not c.__name__.endswith("Model"), c.__name__))
    return found[0] if found else None


def _part_configs(configs: list[type]) -> set[type]:
    """Configs that are a non-text part (vision/audio tower, speech talker, ...) of another, and their parts."""
    parts: set[type] = set()
    todo = [c for cfg in configs for k, c in (getattr(cfg, "sub_configs", None) or {}).items()
            if k != "text_config" and isinstance(c, type)]
    while todo:
        cfg = todo.pop()
        if cfg not in parts:
            parts.add(cfg)
            todo.extend(c for c in (getattr(cfg, "sub_configs", None) or {}).values() if isinstance(c, type))
    return parts


def moe_families() -> list[Family]:
    """One Family per text decoder of every router-registering modeling module, sorted by model type."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    families: dict[str, Family] = {}
    for module_name in _router_modules():
        module = importlib.import_module(module_name)
        routers = _registered(module)
        if not routers:
            continue
        package = module_name.rsplit(".", 1)[0]
        configs = [(t, c) for t, c in CONFIG_MAPPING.items() if c.__module__.startswith(package + ".")]
        parts = _part_configs([c for _, c in configs])
        for model_type, config_cls in configs:
            if config_cls in parts:
                continue
            text_cfg = config_cls().get_text_config()
            text_type = text_cfg.model_type
            if text_type in families:
                continue
            cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text_type) or MODEL_MAPPING_NAMES.get(text_type)
            cls = getattr(transformers, cls_name, None) if isinstance(cls_name, str) else None
            if cls is None:  # a text decoder only reachable inside its multimodal model
                cls = _text_model_class(module, type(text_cfg))
            if cls is None or not cls.__module__.startswith(package + "."):
                continue
            multimodal = type(text_cfg) is not config_cls  # the text part of a vision/omni config
            families[text_type] = Family(text_type, type(text_cfg), cls, routers, multimodal)
    return [families[k] for k in sorted(families)]


def _kept_layers(per_layer: dict[str, list], n: int, keep: int) -> list[int]:
    """Which of `n` layers a `keep`-layer model keeps: the first of each kind, then the first others."""
    kinds, kept = set(), []
    for i in range(n):
        kind = tuple(str(v[i]) for v in per_layer.values())
        if kind not in kinds:
            kinds.add(kind)
            kept.append(i)
    for i in range(n):
        if len(kept) >= keep:
            break
        if i not in kept:
            kept.append(i)
    return sorted(kept[:keep])


def _is_per_layer(name: str, value, n: int) -> bool:
    """A list with one entry per decoder layer, or a hybrid layer-pattern string ("M-M*E...")."""
    if isinstance(value, list):
        return len(value) == n and n > 1
    return isinstance(value, str) and len(value) == n and n > 4 and set(value) <= set("MEA*-=ST")


def _declared_defaults(config_cls) -> dict:
    """Init defaults of a config class (None or "auto" mark a field derived from others)."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(config_cls):
        return {f.name: f.default for f in dataclasses.fields(config_cls)}
    return {k: p.default for k, p in inspect.signature(config_cls.__init__).parameters.items()}


def _field_values(config) -> dict:
    """A config's fields as init kwargs, nested part configs kept as objects.

    A field whose class default is None or "auto" was derived in `__post_init__`; it is left out
    so that the smaller config derives it again from the fields that were shrunk.
    """
    defaults = _declared_defaults(type(config))
    values = {k: v for k, v in config.to_dict().items()
              if not (k in defaults and defaults[k] in (None, "auto")) or _HEAD_DIM.search(k)}
    for name, value in vars(config).items():
        if hasattr(value, "to_dict"):
            values[name] = value
    values.pop("transformers_version", None)
    values.pop("model_type", None)
    return values


def _shrunk_fields(config, layers: int) -> dict:
    """Overrides that make `config` tiny: capped sizes, kept layers, remapped layer indices."""
    values = {**config.to_dict(), **_field_values(config)}
    n = int(values.get("num_hidden_layers") or layers)
    overrides: dict = {}
    for name, value in values.items():
        if isinstance(value, bool):
            if not value and _MOE_SWITCH.search(name):
                overrides[name] = True
            continue
        if (value is None or isinstance(value, int)) and not _SKIP.search(name):
            cap = next((c for pattern, c in _CAPS if re.search(pattern, name)), None)
            if cap is not None:  # a None size is filled in: some default configs leave the MoE unset
                overrides[name] = -cap if cap < 0 else cap if value is None else min(value, cap)
        elif hasattr(value, "to_dict") and name not in ("text_config",):  # nested part config (e.g. an ffn config)
            overrides[name] = type(value)(**{**_field_values(value), **_shrunk_fields(value, layers)})
    per_layer = {k: v for k, v in values.items() if _is_per_layer(k, v, n)}
    kept = _kept_layers(per_layer, n, min(layers, n))
    for name, value in per_layer.items():
        picked = [value[i] for i in kept]
        overrides[name] = "".join(picked) if isinstance(value, str) else picked
    for name, value in values.items():  # layer indices (lists, or dict keys) follow the kept layers
        if name in per_layer or not value or not re.search(r"layer|index|idx", name):
            continue
        if isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            overrides[name] = [kept.index(i) for i in value if i in kept]
        elif isinstance(value, dict) and all(str(x).isdigit() for x in value):
            overrides[name] = {kept.index(int(i)): v for i, v in value.items() if int(i) in kept}
    if "num_hidden_layers" in values:
        overrides["num_hidden_layers"] = len(kept)
    heads, kv = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if isinstance(heads, int) and heads > 0 and "num_attention_heads" in overrides:
        # fewer heads of the same width (rotary sections are sized per head), same query/key-value ratio
        head_dim = values.get("head_dim") or values.get("hidden_size", 0) // heads
        if head_dim and "hidden_size" in overrides:
            overrides["hidden_size"] = overrides["num_attention_heads"] * head_dim
        if isinstance(kv, int) and kv > 0:
            overrides["num_key_value_heads"] = max(1, overrides["num_attention_heads"] * kv // heads)
    if "head_dim" in values and values["head_dim"] is None and "hidden_size" in overrides:  # unset, yet read
        overrides["head_dim"] = overrides["hidden_size"] // overrides.get("num_attention_heads", heads or 1)
    vocab = overrides.get("vocab_size", values.get("vocab_size"))
    for name, value in values.items():  # special token ids must fit the smaller vocabulary
        if vocab and re.search(r"token_id$|token_index$", name) and isinstance(value, int) and value >= vocab:
            overrides[name] = vocab - 1 - (sum(map(ord, name)) % (vocab // 4))
    return overrides


def shrink_config(config, layers: int = TINY_LAYERS):
    """A tiny config of the same class: every size capped by a rule on field names, no family table.

    Top-k is raised to 2 (one expert per token at weight 1 would say nothing about the scoring
    rule) unless the config class refuses it, as one built for top-1 routing does.
    """
    overrides = _shrunk_fields(config, layers)
    if "tie_word_embeddings" in vars(config):
        overrides["tie_word_embeddings"] = False
    types = overrides.get("layer_types") or getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) is None and "sliding_attention" in types:
        overrides["sliding_window"] = 64  # sliding layers without a window cannot build their mask
    topk = {k: 2 for k, v in overrides.items() if re.search(_TOPK_FIELD, k) and v == 1}
    try:
        return type(config)(**{**_field_values(config), **overrides, **topk})
    except Exception:  # noqa: BLE001 - config validators raise their own error classes
        if not topk:
            raise
        return type(config)(**{**_field_values(config), **overrides})


def build_tiny_family(family: Family, seed: int = 0, router_std: float = 1.0):
    """A random-init model of `family` from its shrunk default config, in eval mode.

    Router weights get std `router_std` (init std 0.02 leaves random routers near-uniform, where
    scoring rules are hard to tell apart).
    """
    from sara_moe.architectures import NotAnMoEModelError, _all_router_sites

    config = shrink_config(family.config_class())
    torch.manual_seed(seed)
    model = family.model_class(config).eval()
    try:
        sites = _all_router_sites(model)  # every router site, aligned or not
    except NotAnMoEModelError:  # refused later, by find_routers, with the same message
        return model
    with torch.no_grad():
        for site in sites:
            for weight in site.module.parameters():  # the router's projection(s), whatever they are called
                if weight.dim() == 2 and weight.is_floating_point():
                    weight.normal_(0.0, router_std)
    return model


def expert_count(config) -> int | None:
    """Routed experts per MoE layer as a config states it (the field name varies by family)."""
    for name in ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return None


def meta_model(family: Family):
    """The family's text decoder at the default config's full size, on the meta device (no memory)."""
    with torch.device("meta"):
        return family.model_class(family.config_class())


def _layers_text(layers: list[int], total: int) -> str:
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers[:8])) + (" ..." if len(layers) > 8 else "")


def survey_family(family: Family) -> dict:
    """One row of docs/architectures.md: the tiny model's verdict and the default config's real shape."""
    from sara_moe.architectures import (
        NotAnMoEModelError,
        ScoringProbeError,
        discover_routers,
        find_routers,
        router_site_names,
        scoring_verdict,
    )

    row = {"family": family.model_type, "model_class": family.model_class.__name__,
           "routers": ", ".join(family.router_classes), "multimodal": family.multimodal}
    try:
        model = build_tiny_family(family)
        sites = find_routers(model)
        verdict = scoring_verdict(model, sites)
        others = [name for name in router_site_names(model) if name != sites[0].site]
        row.update(status="tested", slot=sites[0].logits_index, rule=verdict.rule, evidence=verdict.evidence,
                   router_site=sites[0].site + (f" (also: {', '.join(others)})" if others else ""),
                   selection_bias=verdict.selection_bias,
                   shared_experts=any("shared" in n for s in sites[:1] for n, _ in s.parent.named_children()))
    except (NotAnMoEModelError, ScoringProbeError) as exc:
        cause = exc.__cause__
        row["status"] = (f"untested: the shrunk default config does not run ({type(cause).__name__}: {cause})"
                         if cause is not None else f"refused: {exc}")
    except Exception as exc:  # noqa: BLE001 - transformers' own default config fails to build
        row["status"] = f"untested: the shrunk default config does not build ({type(exc).__name__}: {exc})"
    try:
        meta = meta_model(family)
        sites = discover_routers(meta)
        config = meta.config.get_text_config()
        moe = [s.layer for s in sites]
        row.update(default_layers=config.num_hidden_layers, default_experts=expert_count(config),
                   default_moe_layers=_layers_text(moe, config.num_hidden_layers),
                   default_dense_layers=_layers_text(sorted(set(range(config.num_hidden_layers)) - set(moe)),
                                                     config.num_hidden_layers))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        row["default_moe_layers"] = f"default config does not build ({type(exc).__name__})"
    return row
