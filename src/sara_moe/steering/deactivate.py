"""Switching experts and neurons off at inference (SteerMoE-style expert masking, LAPE-style neuron zeroing).

    sara steer deactivate --model PATH --source neurons.json --langs sw --output off_sw.json   # sw's specific neurons
    sara steer deactivate --model PATH --source spec.json --output off.json                   # a steer spec's experts
    sara steer deactivate --model PATH --experts 1:3,5 2:0 --output off.json                   # by hand
    sara eval --model PATH --data items.jsonl --output_dir out --deactivate off_sw.json

    from sara_moe.steering.deactivate import build_deactivation, deactivation
    spec = build_deactivation(model, experts={1: [3]}, neurons=[(0, "dense", 0, [5, 9])])
    with deactivation(model, spec):
        model(**batch)

**Experts** are masked the SteerMoE way: their router logit becomes −inf before top-k, through
`steer.steering` with strength −inf (the logits of the router's `F.linear`, or the selection-only
bias of DeepSeek-V3/GLM4-MoE routers), so the family's own routing code picks the other experts and
renormalises their weights as it always does (softmax over the rest, `norm_topk_prob`, sigmoid scores
renormalised over the chosen). A layer must keep at least `experts_per_token` experts.

**Neurons** are zeroed, i.e. their activation `act(gate(x)) * up(x)` is set to 0 before the down
projection, by the hooks of `architectures.experts.zeroing_hooks`: a forward pre-hook on a dense or
shared MLP's `down_proj` (or JetMoE's `output_linear`) zeroing those input columns; on fused routed
experts, whose intermediate activations never leave the module, a forward hook on the experts module
subtracting, for every token dispatched to the expert, exactly what those neurons added (the output
is linear in the activations, so this is zeroing them up to float rounding, under every
`experts_implementation`). Families with a norm after the experts' down projection are refused.

The spec (JSON, `format` `sara-moe-deactivation-spec/1`) holds `experts` (`[{"layer", "experts"}]`),
`neurons` (`[{"layer", "kind": routed|shared|dense, "expert", "neurons"}]`), the model fingerprint
(`architectures.fingerprint.config_hash`, checked) and where it came from; `<output>.config.json`
beside it is the resolved `DeactivateConfig`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from sara_moe.architectures import experts_per_token, find_routers, model_config
from sara_moe.architectures import experts as X
from sara_moe.architectures.fingerprint import config_hash
from sara_moe.runtime import artifacts
from sara_moe.runtime.options import parse_config
from sara_moe.steering import steer

FORMAT = "sara-moe-deactivation-spec/1"


def _fail(where: str, message: str):
    raise steer.SteeringSpecError(f"{where}: {message}")


def validate_deactivation(spec: dict, model, where: str = "deactivation spec") -> dict:
    """Raise SteeringSpecError (one line) unless `spec` fits `model`; returns `spec`."""
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        _fail(where, f"not a sara-moe deactivation spec (expected format {FORMAT!r}); write one with "
                     "`sara steer deactivate`")
    meta = spec.get("model") or {}
    if meta.get("fingerprint") != config_hash(model):
        _fail(where, f"model fingerprint does not match this model (spec made for "
                     f"{meta.get('name_or_path') or meta.get('model_type')!r}); rerun `sara steer deactivate` on it")
    routers = {s.layer: s for s in find_routers(model, spec.get("router_site"))}
    k = experts_per_token(model)
    for entry in spec.get("experts") or []:
        layer, chosen = entry.get("layer"), entry.get("experts")
        if layer not in routers:
            _fail(where, f"experts: layer {layer} is not an MoE layer; MoE layers are {sorted(routers)}")
        num = int(steer._num_experts(routers[layer]))
        if not chosen or any(not isinstance(e, int) or not 0 <= e < num for e in chosen):
            _fail(where, f"experts: layer {layer}: expert ids must be in 0..{num - 1}, got {chosen}")
        if num - len(set(chosen)) < k:
            _fail(where, f"experts: layer {layer}: masking {len(set(chosen))} of {num} experts leaves fewer than "
                         f"the {k} each token is dispatched to")
    sites = {(s.layer, s.kind): s for s in X.mlp_sites(model)} if spec.get("neurons") else {}
    for entry in spec.get("neurons") or []:
        key = (entry.get("layer"), entry.get("kind"))
        if key not in sites:
            _fail(where, f"neurons: no {key[1]} MLP at layer {key[0]}; this model has {sorted(sites)}")
        site, expert, neurons = sites[key], entry.get("expert", 0), entry.get("neurons")
        if not isinstance(expert, int) or not 0 <= expert < site.num_experts:
            _fail(where, f"neurons: layer {key[0]} {key[1]}: expert {expert} out of range 0..{site.num_experts - 1}")
        if not neurons or any(not isinstance(n, int) or not 0 <= n < site.num_neurons for n in neurons):
            _fail(where, f"neurons: layer {key[0]} {key[1]} expert {expert}: neuron ids must be in "
                         f"0..{site.num_neurons - 1}")
        if site.kind == X.ROUTED and site.layout == "fused" and X.has_post_expert_norm(site):
            _fail(where, f"neurons: {site.name} has a norm after its down projection; its neurons cannot be zeroed "
                         "by a hook")
    return spec


def build_deactivation(model, experts: dict | None = None, neurons=None, source: dict | None = None) -> dict:
    """A spec masking `experts` ({layer: [expert, ...]}) and zeroing `neurons` ([(layer, kind, expert, [ids])]),
    validated against `model`."""
    config = model_config(model)
    spec = {"format": FORMAT, "router_site": find_routers(model)[0].site,
            "model": {"name_or_path": str(getattr(config, "_name_or_path", "")), "model_type": config.model_type,
                      "fingerprint": config_hash(model)},
            "experts": [{"layer": int(layer), "experts": sorted({int(e) for e in chosen})}
                        for layer, chosen in sorted((experts or {}).items())],
            "neurons": [{"layer": int(layer), "kind": kind, "expert": int(expert), "neurons": sorted({int(n) for n in ids})}
                        for layer, kind, expert, ids in (neurons or []) if len(ids)],
            "source": source or {"rule": "hand-made"}}
    return validate_deactivation(spec, model)


def load_deactivation(path, model) -> dict:
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise steer.SteeringSpecError(f"{path}: no such deactivation spec") from None
    except json.JSONDecodeError as err:
        raise steer.SteeringSpecError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    return validate_deactivation(spec, model, where=str(path))


def from_neurons(result: dict, model, langs: list[str], method: str = "lnp", neuron_type: str = "specific",
                 where: str = "neurons.json") -> dict:
    """The spec zeroing the `neuron_type` neurons of `langs` that `sara neurons` found (its neurons.json dict)."""
    lists = (result.get("classification") or {}).get(method, {}).get("neurons")
    if not isinstance(lists, dict):
        _fail(where, f"no {method!r} classification; it has {sorted(result.get('classification') or {})}")
    grouped: dict[tuple, set] = {}
    for lang in langs:
        if lang not in lists:
            _fail(where, f"language {lang!r} not in the classification; it has {sorted(lists)}")
        for layer, kind, expert, neuron in lists[lang].get(neuron_type, []):
            grouped.setdefault((layer, kind, expert), set()).add(neuron)
    neurons = [(layer, kind, expert, sorted(ids)) for (layer, kind, expert), ids in sorted(grouped.items())]
    return build_deactivation(model, neurons=neurons, source={"neurons": where, "method": method, "langs": list(langs),
                                                             "type": neuron_type})


# ----------------------------------------------------------------------------- apply


@contextlib.contextmanager
def deactivation(model, spec: dict):
    """Inside the block `spec`'s experts receive no token and its neurons output zero (hooks removed after)."""
    validate_deactivation(spec, model)
    handles = []
    with contextlib.ExitStack() as stack:
        if spec.get("experts"):
            steer_spec = steer.build_spec(model, {e["layer"]: e["experts"] for e in spec["experts"]})
            steer_spec["router_site"] = spec.get("router_site")
            stack.enter_context(steer.steering(model, steer_spec, float("-inf")))
        sites = {(s.layer, s.kind): s for s in X.mlp_sites(model)} if spec.get("neurons") else {}
        targets: dict = {}
        for entry in spec.get("neurons") or []:
            site = sites[(entry["layer"], entry["kind"])]
            targets.setdefault(site.name, (site, []))[1].append((entry["expert"], entry["neurons"]))
        try:
            for site, chosen in targets.values():
                handles += X.zeroing_hooks(site, chosen)
            yield spec
        finally:
            for handle in handles:
                handle.remove()


# ----------------------------------------------------------------------------- CLI


@dataclass
class DeactivateConfig:
    """Options of `sara steer deactivate` (flags and YAML keys are these names)."""

    model: str = field(metadata={"help": "model directory or hub id"})
    output: str = field(metadata={"help": "deactivation spec JSON to write (<output>.config.json beside it)"})
    source: str | None = field(default=None, metadata={
        "help": "neurons.json of `sara neurons` (zero neurons) or a `sara steer identify` spec (mask its experts)"})
    langs: list[str] | None = field(default=None, metadata={"help": "languages whose neurons are zeroed (neurons.json)"})
    method: str = field(default="lnp", metadata={"help": "classification read from neurons.json",
                                                 "choices": ["lnp", "lape"]})
    neuron_type: str = field(default="specific", metadata={"help": "neuron type zeroed",
                                                           "choices": ["specific", "related", "agnostic"]})
    experts: list[str] | None = field(default=None, metadata={"help": "experts to mask by hand: LAYER:E,E LAYER:E ..."})
    device: str = field(default="cpu", metadata={"help": "auto | cpu | cuda | cuda:N (only to read the model)"})
    trust_remote_code: bool = False
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})


def _hand_experts(items: list[str]) -> dict:
    """`["1:0", "3", "2:5"]` (what `--experts 1:0,3 2:5` becomes: lists split at commas) -> {1: [0, 3], 2: [5]}."""
    out: dict[int, list[int]] = {}
    layer = None
    for item in items:
        text = str(item).strip()
        try:
            if ":" in text:
                head, _, text = text.partition(":")
                layer = int(head)
                out.setdefault(layer, [])
            if layer is None:
                raise ValueError
            out[layer] += [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--experts {item!r}: write LAYER:EXPERT,EXPERT ... (e.g. 12:3,40 13:1)") from None
    return out


def deactivate_to_file(cfg: DeactivateConfig) -> dict:
    """The spec `cfg` describes, written to `cfg.output` (refused if it exists, unless `overwrite`)."""
    if (cfg.source is None) == (cfg.experts is None):
        raise ValueError("sara steer deactivate: give --source (neurons.json or a steering spec) or --experts, not both")
    artifacts.refuse_existing(cfg.output, cfg.overwrite)
    from sara_moe.runtime.loading import load_model_and_tokenizer

    model, _tokenizer = load_model_and_tokenizer(cfg.model, "float32", cfg.device, cfg.trust_remote_code)
    if cfg.experts is not None:
        spec = build_deactivation(model, experts=_hand_experts(cfg.experts))
    else:
        try:
            data = json.loads(Path(cfg.source).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise steer.SteeringSpecError(f"{cfg.source}: no such file") from None
        except json.JSONDecodeError as err:
            raise steer.SteeringSpecError(f"{cfg.source}: not valid JSON ({err.msg})") from None
        if isinstance(data, dict) and data.get("format") == steer.SPEC_FORMAT:
            steer.validate_spec(data, model, where=cfg.source)
            spec = build_deactivation(model, experts={e["layer"]: e["experts"] for e in data["layers"]},
                                      source={"steering_spec": cfg.source})
        else:
            if not cfg.langs:
                raise ValueError(f"--langs: name the languages whose neurons {cfg.source} should zero")
            spec = from_neurons(data, model, cfg.langs, cfg.method, cfg.neuron_type, where=cfg.source)
    config = artifacts.config_dict(cfg)
    spec["metadata"] = artifacts.run_metadata(config, device=cfg.device)
    artifacts.write_json(f"{cfg.output}.config.json", config, overwrite=cfg.overwrite)
    artifacts.write_json(cfg.output, spec, overwrite=cfg.overwrite)
    return spec


def deactivate_cli(argv=None) -> int:
    cfg = parse_config(DeactivateConfig, argv, "sara steer deactivate", __doc__.split("\n\n")[0])
    spec = deactivate_to_file(cfg)
    neurons = sum(len(e["neurons"]) for e in spec["neurons"])
    experts = sum(len(e["experts"]) for e in spec["experts"])
    print(f"deactivation spec written to {cfg.output}: {experts} expert(s) masked, {neurons} neuron(s) zeroed")
    return 0
