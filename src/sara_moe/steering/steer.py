"""Inference-time router steering: the training-free baseline (Bandarkar et al.).

    sara steer identify --model PATH --task_data en_task.jsonl [--general_data en_text.jsonl] \\
        [--layers auto|7-34|7,8,9] [--top_k 2] --output spec.json      # or --config identify.yaml

    from sara_moe.steering.steer import load_spec, steering
    spec = load_spec("spec.json", model)               # validated against this model
    with steering(model, spec, strength=2.0):          # every forward and generate() is steered
        out = model.generate(**batch)
    with steering(model, spec, 2.0, langs=["sw", "yo"]) as steer:
        steer.set_language("sw")                       # whole batch; or per example inside it:
        steer.set_row_languages(["sw", "en"])          # (or steer.row_mask = [True, False])
        model(**batch)
    spec = build_spec(model, {12: [3, 40]})            # a hand-made spec

**Identify.** Every task and general text runs through the frozen model; per MoE layer in the
band, `frequency[e]` = fraction of real tokens whose top-k includes expert e. `score[e] =
task_frequency[e] - general_frequency[e]` (without general data the baseline is the uniform
`k/E`), and the `--top-k` experts with the highest scores are chosen in each layer. `--layers
auto` is `architectures.middle_band` (analysis.json's `paper_band`); `7-34` keeps the MoE
layers in that inclusive range; `7,8,9` must all be MoE layers; negatives count from the end
(`architectures.parse_layer_spec`, the one layer-spec parser). Data files are JSONL with, per
line, `{"text": str}` (tokenized as-is), `{"question": str[, "answer": str]}` (an instruction
prompt, with its answer if given, through the chat template when there is one) or a canonical
corpus group (`corpus.read_corpus`; field `--lang`, default `en`); other sources (parquet, CSV,
a datasets directory) go through read_corpus. Every value is tokenized by `corpus.encode` with
`eos=False` (no EOS after a plain-template answer: task data is never trained on, and the ids
stay those earlier specs were identified from).
The spec (JSON, published through `artifacts`; an existing one is refused unless
`--overwrite`; `<output>.config.json` beside it is the resolved `IdentifyConfig`) holds the
layers, experts, scores, frequencies, the data files with their sha256, the rule, the layer
band, run metadata (with the resolved config) and the `artifacts` fingerprints: the
model config (checked; dtype, path and version fields left out, so fp32/bf16 loads and
fine-tunes of the same architecture match), the tokenizer (checked when given) and the
router weights (recorded only).

**Apply.** `steering()` adds `strength` to the chosen experts' scores in the chosen layers,
inside the router's forward, so top-k selection changes: routers without a selection-only bias
(Qwen, Mixtral, OLMoE, DeepSeek-V2, GPT-OSS) get it on the `[N, E]` output of the router's
`F.linear` (a TorchFunctionMode active only during that router's forward); routers whose
`RouterSite.selection_bias` is set (`e_score_correction_bias`: DeepSeek-V3, GLM4-MoE) get it on
the selection scores through that buffer, swapped for the call and restored after. Routers under a PEFT wrapper are the
same modules (found by class), so LoRA models work. Useful strengths differ: logits take
~0.5-5, sigmoid selection scores live in (0, 1). Strength 0 is bit-identical to no steering.
Recorded router logits of steered layers include the bias. With `langs`, the handle must be
told each batch's language(s) (a forward without it raises: the model cannot see languages).
Hooks are removed and buffers restored on exit, even after an exception; nested steerings stack.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sara_moe.architectures import (
    LAYER_SPEC_HELP,
    NotAnMoEModelError,
    find_routers,
    model_config,
    num_hidden_layers,
    resolve_layer_spec,
    router_weight,
    set_router_site,
)
from sara_moe.architectures.fingerprint import config_hash, router_hash, tokenizer_hash
from sara_moe.data.corpus import CorpusError, encode, iter_jsonl, parse_group, read_corpus
from sara_moe.routing import RouterRecorder, position_ids_from_mask
from sara_moe.runtime import artifacts
from sara_moe.runtime.options import parse_config

SPEC_FORMAT = "sara-moe-steering-spec/1"
RULE = ("per MoE layer in the band: score = task activation frequency - general activation frequency "
        "(fraction of real tokens whose top-k includes the expert; uniform k/E without general data); "
        "the top_k experts by score")


class SteeringSpecError(ValueError):
    """A steering spec that does not fit the model; the message is one line."""


def _file_sha256(path) -> str | None:
    return artifacts.file_sha256(path) if Path(path).is_file() else None


# ----------------------------------------------------------------------------- data


def _record_value(record, where: str, lang: str):
    if isinstance(record, dict) and isinstance(record.get("text"), str) and record["text"].strip():
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("question"), str) and record["question"].strip():
        answer = record.get("answer")
        if isinstance(answer, str) and answer.strip():
            return {"prompt": record["question"], "response": answer}
        return [{"role": "user", "content": record["question"]}]
    group = parse_group(record, where)
    if lang not in group.texts:
        raise CorpusError(f"{where}: no 'text' or 'question' field and no {lang!r} field (languages: "
                          f"{sorted(group.texts)}); pass --lang or use {{\"text\": ...}} lines")
    return group.texts[lang]


def read_texts(path, lang: str = "en") -> list:
    """Values to run through the model: strings, prompt/response pairs or message lists."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"{p}: no such file")
    if p.suffix not in (".jsonl", ".ndjson"):
        return [g.texts[lang] for g in read_corpus(path, anchor=lang)]
    values = []
    for where, _line_no, record in iter_jsonl(p, CorpusError):
        values.append(_record_value(record, where, lang))
    if not values:
        raise CorpusError(f"{p}: no texts")
    return values


# ----------------------------------------------------------------------------- identify


@torch.no_grad()
def expert_frequencies(model, tokenizer, values, layers: list[int], batch_size: int = 8, max_length: int = 512,
                       desc: str = "routing", progress: bool = True) -> tuple[dict, int, int]:
    """({layer: fp32 [E] fraction of real tokens whose top-k includes e}, real tokens, k)."""
    from tqdm.auto import tqdm

    from sara_moe.runtime.loading import pad_batch

    device = next(model.parameters()).device
    sequences = sorted((encode(v, tokenizer, max_length, eos=False)[0] for v in values), key=len)
    sequences = [s for s in sequences if s]
    if not sequences:
        raise CorpusError("no tokens in the data after tokenization")
    counts: dict[int, torch.Tensor] = {}
    tokens, k = 0, 0
    recorder = RouterRecorder(model, layers=layers, keep_topk=True)
    for start in tqdm(range(0, len(sequences), batch_size), desc=desc, disable=not progress):
        ids, mask = pad_batch(tokenizer, sequences[start:start + batch_size], side="right")
        ids, mask = ids.to(device), mask.to(device)
        with recorder:
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
        real = mask.reshape(-1).bool()
        for layer in layers:
            num_experts = recorder.scores[layer].shape[-1]
            indices = recorder.topk[layer][1][real].long()
            k = indices.shape[-1]
            hits = torch.zeros(indices.shape[0], num_experts, device=device).scatter_(1, indices, 1.0)
            counts[layer] = counts.get(layer, 0) + hits.sum(0).cpu()
        tokens += int(real.sum())
    return {layer: c / tokens for layer, c in counts.items()}, tokens, k


def identify(model, tokenizer, task_data, general_data=None, layers="auto", top_k: int = 2, lang: str = "en",
             batch_size: int = 8, max_length: int = 512, progress: bool = True) -> dict:
    """Steering spec (a JSON-ready dict) from English task data vs general English text."""
    model.eval()
    band, routers = resolve_layer_spec(model, layers, field_name="--layers"), find_routers(model)
    num_experts = _num_experts(routers[0])
    if not 0 < top_k <= num_experts:
        raise ValueError(f"--top-k {top_k}: must be between 1 and the {num_experts} experts")
    task_freq, task_tokens, k = expert_frequencies(model, tokenizer, read_texts(task_data, lang), band,
                                                   batch_size, max_length, "task data", progress)
    general_tokens = 0
    if general_data is not None:
        general_freq, general_tokens, _ = expert_frequencies(model, tokenizer, read_texts(general_data, lang), band,
                                                             batch_size, max_length, "general data", progress)
    else:
        general_freq = {layer: torch.full((num_experts,), k / num_experts) for layer in band}
    chosen = []
    for layer in band:
        score = task_freq[layer] - general_freq[layer]
        experts = torch.topk(score, top_k).indices.tolist()  # ties: lowest expert id first
        chosen.append({"layer": layer, "experts": experts, "scores": [round(float(score[e]), 6) for e in experts],
                       "task_frequency": [round(float(x), 6) for x in task_freq[layer]],
                       "general_frequency": [round(float(x), 6) for x in general_freq[layer]]})
    return {
        "format": SPEC_FORMAT,
        "rule": RULE,
        "router_site": routers[0].site,  # the routers steered, where a layer holds several (JetMoE)
        "model": {"name_or_path": str(getattr(model_config(model), "_name_or_path", "")),
                  "model_type": model_config(model).model_type, "fingerprint": config_hash(model),
                  "tokenizer_fingerprint": tokenizer_hash(tokenizer),
                  "routers": router_hash(model), "num_experts": num_experts,
                  "experts_per_token": k, "moe_layers": [s.layer for s in routers],
                  "num_hidden_layers": num_hidden_layers(model), "scoring": routers[0].scoring},
        "data": {"task": {"path": str(task_data), "sha256": _file_sha256(task_data), "tokens": task_tokens},
                 "general": None if general_data is None else {
                     "path": str(general_data), "sha256": _file_sha256(general_data), "tokens": general_tokens}},
        "config": {"layers": layers if isinstance(layers, str) else list(layers), "resolved_layers": band,
                   "top_k": top_k, "lang": lang, "batch_size": batch_size, "max_length": max_length},
        "layers": chosen,
    }


def save_spec(spec: dict, path, overwrite: bool = True) -> Path:
    """Write the spec through `artifacts` (atomic; refused if it exists and not `overwrite`)."""
    return artifacts.write_json(path, spec, overwrite=overwrite)


# ----------------------------------------------------------------------------- validate


def validate_spec(spec: dict, model, tokenizer=None, where: str = "steering spec") -> dict:
    """Raise SteeringSpecError (one line) unless `spec` fits `model`; returns `spec`."""
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT or not isinstance(spec.get("layers"), list):
        raise SteeringSpecError(f"{where}: not a sara-moe steering spec (expected format {SPEC_FORMAT!r})")
    meta = spec.get("model") or {}
    if meta.get("fingerprint") != config_hash(model):
        raise SteeringSpecError(f"{where}: model fingerprint does not match this model (spec made for "
                                f"{meta.get('name_or_path') or meta.get('model_type')!r}, model_type "
                                f"{meta.get('model_type')!r}); run `sara steer identify` on this model")
    if tokenizer is not None and meta.get("tokenizer_fingerprint") not in (None, tokenizer_hash(tokenizer)):
        raise SteeringSpecError(f"{where}: tokenizer fingerprint does not match this tokenizer; run "
                                "`sara steer identify` with this model's tokenizer")
    try:
        routers = {s.layer: s for s in find_routers(model, spec.get("router_site"))}
    except NotAnMoEModelError as exc:
        raise SteeringSpecError(f"{where}: {exc}") from exc
    for entry in spec["layers"]:
        layer, experts = (entry.get("layer"), entry.get("experts")) if isinstance(entry, dict) else (None, None)
        if not isinstance(layer, int) or not isinstance(experts, list) or not experts:
            raise SteeringSpecError(f"{where}: each layers entry needs an int 'layer' and a non-empty 'experts' list")
        if layer not in routers:
            raise SteeringSpecError(f"{where}: layer {layer} is not an MoE layer; MoE layers are {sorted(routers)}")
        num_experts = _num_experts(routers[layer])
        bad = [e for e in experts if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < num_experts]
        if bad:
            raise SteeringSpecError(f"{where}: layer {layer}: expert ids {bad} out of range 0..{num_experts - 1}")
    return spec


def build_spec(model, experts_by_layer: dict, tokenizer=None) -> dict:
    """A hand-made spec, e.g. `build_spec(model, {12: [3, 40]})`, validated against `model`."""
    spec = {"format": SPEC_FORMAT, "rule": "hand-made", "router_site": find_routers(model)[0].site,
            "model": {"model_type": model_config(model).model_type, "fingerprint": config_hash(model),
                      "tokenizer_fingerprint": None if tokenizer is None else tokenizer_hash(tokenizer)},
            "layers": [{"layer": int(layer), "experts": [int(e) for e in experts]}
                       for layer, experts in sorted(experts_by_layer.items())]}
    return validate_spec(spec, model, tokenizer)


def load_spec(path, model, tokenizer=None) -> dict:
    """Read a spec file and validate it against `model` (and `tokenizer` if given)."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SteeringSpecError(f"{path}: no such steering spec") from None
    except json.JSONDecodeError as err:
        raise SteeringSpecError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    return validate_spec(spec, model, tokenizer, where=str(path))


def _num_experts(site) -> int:
    return int(router_weight(site).shape[0])  # PEFT parametrizations keep the [E, H] shape


# ----------------------------------------------------------------------------- apply


class _AddToLinearOutput(TorchFunctionMode):
    """Adds `bias` to the output of the first `F.linear` with `num_experts` outputs."""

    def __init__(self, bias: torch.Tensor, num_experts: int):
        super().__init__()
        self.bias, self.num_experts, self.applied = bias, num_experts, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and not self.applied and out.shape[-1] == self.num_experts:
            self.applied = True
            bias = self.bias.to(out.dtype)
            out = out + (bias.view(out.shape) if bias.dim() == 2 else bias)
        return out


class Steering:
    """Handle yielded by `steering()`; `row_mask` (bool [B] or None = all rows) picks steered examples."""

    def __init__(self, model, spec: dict, strength: float, langs: list[str] | None):
        self.strength, self.langs = float(strength), None if langs is None else list(langs)
        self.row_mask: torch.Tensor | list[bool] | None = None
        self._language_set = langs is None
        routers = {s.layer: s for s in find_routers(model, spec.get("router_site"))}  # the site identify read
        self._targets = []  # (router site, bias [E] fp32)
        for entry in spec["layers"]:
            site = routers[entry["layer"]]
            bias = torch.zeros(_num_experts(site), dtype=torch.float32)
            bias[entry["experts"]] = self.strength
            self._targets.append((site, bias))
        self._handles: list = []
        self._on_device: dict = {}
        self._active: dict = {}  # router name -> saved correction bias or the active mode, during its forward

    def set_language(self, lang: str) -> None:
        """Whole batch in `lang`: steer it iff `lang` is a steered language (or langs is None)."""
        self.row_mask = None if self.langs is None or lang in self.langs else [False]
        self._language_set = True

    def set_row_languages(self, row_langs: list[str]) -> None:
        """One language per batch row; rows in a steered language are steered."""
        self.row_mask = [self.langs is None or lang in self.langs for lang in row_langs]
        self._language_set = True

    def _row_bias(self, bias: torch.Tensor, rows: int, device) -> torch.Tensor:
        """`[E]` bias for all rows, or `[rows, E]` with zeros outside `row_mask`."""
        key = (id(bias), device)
        if key not in self._on_device:  # one host-to-device copy per router and device
            self._on_device[key] = bias.to(device)
        bias = self._on_device[key]
        if self.row_mask is None:
            return bias
        mask = torch.as_tensor(self.row_mask, dtype=torch.bool, device=device).reshape(-1)
        if mask.numel() == 1:
            mask = mask.expand(rows)
        elif rows % mask.numel():
            raise ValueError(f"steering row_mask has {mask.numel()} rows but the router saw {rows} tokens")
        mask = mask.repeat_interleave(rows // mask.numel())
        return torch.where(mask[:, None], bias, torch.zeros_like(bias))

    def _pre_hook(self, site, bias):
        def hook(module, args, kwargs):
            if not self._language_set:
                raise RuntimeError("steering(langs=...) needs steer.set_language(lang) or "
                                   "steer.set_row_languages([...]) before the forward")
            hidden = args[0] if args else next(iter(kwargs.values()))
            rows = hidden.numel() // hidden.shape[-1]
            row_bias = self._row_bias(bias, rows, hidden.device)
            if site.selection_bias:  # steer through the native selection-only bias (DeepSeek-V3 style)
                self._active[site.name] = module.e_score_correction_bias
                module.e_score_correction_bias = module.e_score_correction_bias + row_bias
            else:
                self._active[site.name] = _AddToLinearOutput(row_bias, bias.numel())
                self._active[site.name].__enter__()

        return hook

    def _post_hook(self, site):
        def hook(module, args, output):
            saved = self._active.pop(site.name, None)
            if isinstance(saved, torch.Tensor):  # the original correction bias
                module.e_score_correction_bias = saved
            elif saved is not None:
                saved.__exit__(None, None, None)
                if not saved.applied and output is not None:
                    raise SteeringSpecError(f"router {site.name} computes its logits without F.linear, so steering "
                                            "cannot reach it; leave this family out of steering runs")

        return hook

    def attach(self) -> None:
        for site, bias in self._targets:
            self._handles.append(site.module.register_forward_pre_hook(self._pre_hook(site, bias), with_kwargs=True))
            # prepended, so nested steerings of one router undo their changes last-in first-out
            self._handles.append(site.module.register_forward_hook(self._post_hook(site), prepend=True,
                                                                   always_call=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextlib.contextmanager
def steering(model, spec: dict, strength: float, langs: list[str] | None = None):
    """Steer `model`'s routers toward `spec`'s experts by `strength` inside the `with` block.

    With `langs`, call `steer.set_language(lang)` or `steer.set_row_languages([...])` on the
    yielded handle before each forward (a forward without it raises); without `langs` every row
    is steered unless `steer.row_mask` says otherwise.
    """
    validate_spec(spec, model)
    handle = Steering(model, spec, strength, langs)
    handle.attach()
    try:
        yield handle
    finally:
        handle.detach()


# ----------------------------------------------------------------------------- CLI


@dataclass
class IdentifyConfig:
    """Options of `sara steer identify` (flags and YAML keys are these names)."""

    model: str = field(metadata={"help": "model directory or hub id"})
    task_data: str = field(metadata={"help": "English task data (JSONL, see the module docs)"})
    output: str = field(metadata={"help": "steering spec JSON to write (<output>.config.json beside it)"})
    general_data: str | None = field(default=None, metadata={"help": "general English text; none = uniform k/E"})
    layers: str = field(default="auto", metadata={"help": "layers to steer: " + LAYER_SPEC_HELP})
    top_k: int = field(default=2, metadata={"help": "experts chosen per layer"})
    lang: str = field(default="en", metadata={"help": "field read from canonical corpus lines"})
    batch_size: int = field(default=8, metadata={"help": "texts per forward"})
    max_length: int = field(default=512, metadata={"help": "tokens kept per text"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "dtype the weights are loaded in",
                                                    "choices": ["float32", "bfloat16", "float16"]})
    router_site: str | None = field(default=None, metadata={
        "help": "router inside a decoder layer where it has several (JetMoE); none = the family default"})
    trust_remote_code: bool = False
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})


def identify_to_file(cfg: IdentifyConfig) -> dict:
    """`identify` on `cfg.model`, written to `cfg.output` (refused if it exists, unless `overwrite`)
    with `<output>.config.json`, the resolved config, beside it; returns the spec."""
    if cfg.batch_size < 1 or cfg.max_length < 1:
        raise ValueError("--batch_size and --max_length must be positive")
    artifacts.refuse_existing(cfg.output, cfg.overwrite)  # before the model runs
    from sara_moe.runtime.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    set_router_site(model, cfg.router_site)
    spec = identify(model, tokenizer, cfg.task_data, cfg.general_data, cfg.layers, cfg.top_k, cfg.lang,
                    cfg.batch_size, cfg.max_length)
    config = artifacts.config_dict(cfg)
    spec["metadata"] = artifacts.run_metadata(config, device=cfg.device)
    artifacts.write_json(f"{cfg.output}.config.json", config)
    save_spec(spec, cfg.output, overwrite=cfg.overwrite)
    return spec


def identify_cli(argv=None) -> int:
    cfg = parse_config(IdentifyConfig, argv, "sara steer identify", "Find the task experts and write a steering spec.")
    spec = identify_to_file(cfg)
    for entry in spec["layers"]:
        print(f"layer {entry['layer']}: experts {entry['experts']} scores {entry['scores']}")
    print(f"steering spec written to {cfg.output}")
    return 0
