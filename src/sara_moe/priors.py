"""SARA stage 2: cache the frozen model's pooled anchor routing per group (`sara priors`).

    sara priors --model PATH --data corpus.jsonl --output priors.safetensors [--pooling all] [--anchor en]

    from sara_moe.priors import extract_priors, load_priors
    extract_priors("runs/tiny", "examples/parallel.jsonl", "runs/priors.safetensors")
    cache = load_priors("runs/priors.safetensors")   # PriorCache(table [G, L, E], ids, layers, fingerprint)
    cache.check(model, tokenizer, pooling="all")      # ValueError naming the part that differs

The starting model runs once, under `no_grad`, over the anchor side of every group (strings
as-is, instruction values through the chat template, exactly as training renders them:
`train_data.encode_example`). Each MoE layer's router distribution is averaged over the pooling span:
`all` (every real token of prompt + response, the paper's choice), `prompt` or `response`.
The file holds one float32 tensor `priors [num_groups, num_moe_layers, num_experts]` and, in
its metadata (JSON strings), `ids` (row i belongs to group ids[i]), `layers` (decoder index of
each MoE layer) and `fingerprint` (model config hash, tokenizer hash, chat template hash,
pooling span, layer list, anchor language). Training refuses a cache whose fingerprint
differs from its own model, tokenizer or pooling.

Work is streamed in chunks of groups; each finished chunk is saved in `<output>.partial/`, so
an interrupted run resumes where it stopped (with the same fingerprint). The final file is
written to a temporary name and renamed; `<output>.config.json` records the resolved config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .architectures import find_routers
from .corpus import CorpusError, PLAIN_TEMPLATE, read_corpus
from .loading import load_model_and_tokenizer
from .routing import POOLINGS, RouterRecorder, pooled_routing
from .train_data import encode_example

# Config keys that describe a run, not the network: training tools rewrite some of them.
VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "name_or_path", "torch_dtype", "dtype",
                        "output_router_logits", "router_aux_loss_coef", "use_cache", "pad_token_id",
                        "_attn_implementation", "_attn_implementation_autoset", "_experts_implementation",
                        "architectures", "tie_word_embeddings"}


@dataclass
class PriorsConfig:
    model: str = field(metadata={"help": "model directory (save_pretrained) or hub id"})
    data: str = field(metadata={"help": "parallel corpus (JSONL or any datasets source)"})
    output: str = field(metadata={"help": "priors file to write (.safetensors)"})
    pooling: str = field(default="all", metadata={"help": "token span pooled: all | prompt | response"})
    anchor: str = field(default="en", metadata={"help": "anchor language key of the corpus"})
    batch_size: int = 8
    max_length: int = field(default=1024, metadata={"help": "tokens kept per sequence (keep_start truncation)"})
    chunk_groups: int = field(default=512, metadata={"help": "groups per resumable chunk"})
    device: str = "auto"
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    trust_remote_code: bool = False


# ----------------------------------------------------------------------------- fingerprint
def _sha(obj) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def model_config_hash(model) -> str:
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = model.get_base_model().config
    data = config.to_dict()

    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in VOLATILE_CONFIG_KEYS}

    return _sha(clean(data))


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha(body + json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str))


def chat_template_hash(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    return _sha(template if template else "plain:" + PLAIN_TEMPLATE)


def fingerprint(model, tokenizer, pooling: str, layers: list[int], anchor: str) -> dict:
    return {"model_config": model_config_hash(model), "tokenizer": tokenizer_hash(tokenizer),
            "chat_template": chat_template_hash(tokenizer), "pooling": pooling,
            "layers": [int(x) for x in layers], "anchor": anchor,
            "scoring": find_routers(model)[0].scoring}  # the verified rule the priors were computed with


def fingerprint_diff(expected: dict, found: dict) -> list[str]:
    return [key for key in expected if expected.get(key) != found.get(key)]


@dataclass
class PriorCache:
    """A loaded priors file: `table [G, L, E]` float32, row per group id, column per MoE layer."""

    table: torch.Tensor
    ids: list
    layers: list
    fingerprint: dict
    path: str = ""

    def row_of(self) -> dict:
        return {gid: i for i, gid in enumerate(self.ids)}

    def check(self, model, tokenizer, pooling: str, anchor: str) -> None:
        """Raise a one-line ValueError if this cache was made with another model/tokenizer/pooling."""
        ours = fingerprint(model, tokenizer, pooling, [s.layer for s in find_routers(model)], anchor)
        bad = fingerprint_diff(ours, self.fingerprint)
        if bad:
            detail = "; ".join(f"{k}: cache {self.fingerprint.get(k)!r} vs run {ours[k]!r}" for k in bad)
            raise ValueError(f"{self.path}: prior cache does not match this run ({detail}); "
                             "rerun `sara priors` with this model, tokenizer and pooling")


def load_priors(path) -> PriorCache:
    from safetensors import safe_open

    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such priors file; create it with `sara priors`")
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
        if "priors" not in fh.keys() or "fingerprint" not in meta:
            raise ValueError(f"{path}: not a sara priors file (needs tensor 'priors' and metadata 'fingerprint')")
        table = fh.get_tensor("priors")
    ids, layers = json.loads(meta["ids"]), json.loads(meta["layers"])
    if tuple(table.shape[:2]) != (len(ids), len(layers)):
        raise ValueError(f"{path}: priors tensor {tuple(table.shape)} does not match {len(ids)} ids x {len(layers)} layers")
    return PriorCache(table.float(), ids, layers, json.loads(meta["fingerprint"]), path)


# ----------------------------------------------------------------------------- extraction
def _anchor_sequences(groups, tokenizer, anchor: str, pooling: str, max_length: int):
    for group in groups:
        ids, prompt_len = encode_example(group.texts[anchor], tokenizer, max_length)
        span = {"all": len(ids), "prompt": prompt_len, "response": len(ids) - prompt_len}[pooling]
        if span == 0:
            raise CorpusError(f"{group.source}:{group.line}: field {anchor!r} of group {group.id!r} has no "
                              f"{pooling} tokens (after truncation to {max_length}); use --pooling all")
        yield ids, prompt_len


def _save_atomic(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def extract_priors(model, data, output, pooling: str = "all", anchor: str = "en", batch_size: int = 8,
                   max_length: int = 1024, chunk_groups: int = 512, tokenizer=None, device: str = "auto",
                   dtype: str = "float32", trust_remote_code: bool = False, progress: bool = True) -> Path:
    """Write the priors file for `data`'s anchor side; returns its path. Resumes a partial run."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    config = dict(model=str(model), data=str(data), output=str(output), pooling=pooling, anchor=anchor,
                  batch_size=batch_size, max_length=max_length, chunk_groups=chunk_groups, device=device,
                  dtype=dtype)
    if isinstance(model, (str, Path)):
        model, tokenizer = load_model_and_tokenizer(str(model), dtype, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise ValueError("extract_priors needs a tokenizer when given a model object")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model.to(dev).eval()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    groups = list(read_corpus(data, anchor=anchor))  # one-line error for a group without the anchor
    if not groups:
        raise CorpusError(f"{data}: no groups")
    ids = [g.id for g in groups]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise CorpusError(f"{data}: group id {dup!r} appears more than once; ids must be unique")
    recorder = RouterRecorder(model)
    layers = recorder.layers
    fp = fingerprint(model, tokenizer, pooling, layers, anchor)
    partial = out.with_name(out.name + ".partial")
    state = {"fingerprint": fp, "ids_hash": _sha(ids), "chunk_groups": chunk_groups, "max_length": max_length}
    if partial.is_dir():
        old = json.loads((partial / "state.json").read_text()) if (partial / "state.json").is_file() else {}
        if old != state:
            shutil.rmtree(partial)  # a leftover from another model/corpus/pooling: start over
    partial.mkdir(exist_ok=True)
    (partial / "state.json").write_text(json.dumps(state))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    chunks = [groups[i: i + chunk_groups] for i in range(0, len(groups), chunk_groups)]
    bar = tqdm(total=len(groups), desc="sara priors", unit="group", disable=not progress)
    from safetensors.torch import load_file

    parts = []
    for index, chunk in enumerate(chunks):
        shard = partial / f"chunk_{index:06d}.safetensors"
        if shard.is_file():
            parts.append(load_file(str(shard))["priors"])
            bar.update(len(chunk))
            continue
        encoded = list(_anchor_sequences(chunk, tokenizer, anchor, pooling, max_length))
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # length-sorted batches pad less
        rows = torch.empty(len(chunk), len(layers), 0)
        for start in range(0, len(order), batch_size):
            picked = order[start: start + batch_size]
            pooled = pooled_routing(model, recorder, [encoded[i][0] for i in picked], pad_id,
                                    [encoded[i][1] for i in picked], pooling)
            if rows.shape[-1] == 0:
                rows = torch.zeros(len(chunk), len(layers), pooled.shape[-1])
            rows[picked] = pooled
            bar.update(len(picked))
        _save_atomic(shard, {"priors": rows}, {})
        parts.append(rows)
    bar.close()
    table = torch.cat(parts, dim=0)
    if not torch.isfinite(table).all():
        raise ValueError(f"{model.__class__.__name__}: router probabilities are not finite; check the model weights")
    metadata = {"ids": json.dumps(ids), "layers": json.dumps(layers), "fingerprint": json.dumps(fp),
                "config": json.dumps(config), "format": "sara-priors/1"}
    _save_atomic(out, {"priors": table}, metadata)
    tmp_cfg = out.with_name(out.name + ".config.json.tmp")
    tmp_cfg.write_text(json.dumps({**config, "fingerprint": fp}, indent=2))
    os.replace(tmp_cfg, out.with_name(out.name + ".config.json"))
    shutil.rmtree(partial, ignore_errors=True)
    return out


def priors_cli(argv=None) -> int:
    from trl import TrlParser

    (cfg,) = TrlParser((PriorsConfig,)).parse_args_and_config(args=argv)
    out = extract_priors(**asdict(cfg))
    cache = load_priors(out)
    print(f"priors {tuple(cache.table.shape)} (groups, MoE layers, experts) written to {out}")
    return 0
