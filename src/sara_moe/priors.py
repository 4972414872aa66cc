"""SARA stage 2: cache the frozen model's pooled anchor routing per group (`sara priors`).

    sara priors --model PATH --data corpus.jsonl --output priors.safetensors [--pooling all] [--anchor en]
    sara priors --config priors.yaml --output other.safetensors    # YAML of these fields; flags override it

    from sara_moe.priors import extract_priors, load_priors
    extract_priors("runs/tiny", "examples/parallel.jsonl", "runs/priors.safetensors")
    cache = load_priors("runs/priors.safetensors")   # PriorCache(table [G, L, E], ids, layers, fingerprint)
    cache.check(model, tokenizer, pooling="all", anchor="en")  # PriorsError naming the part that differs

The starting model runs once, under `no_grad`, over the anchor side of every group (strings
as-is, instruction values through the chat template, exactly as training renders them:
`corpus.encode`). Each MoE layer's router distribution is averaged over the pooling span:
`all` (every real token of prompt + response, the paper's choice), `prompt` or `response`.
The file holds one float32 tensor `priors [num_groups, num_moe_layers, num_experts]` and, in
its metadata (JSON strings), `ids` (row i belongs to group ids[i]), `layers` (decoder index of
each MoE layer), `text_sha` (per row, the hash of the anchor text it was computed from) and
`fingerprint` (`architectures.fingerprint.model_fingerprint`: config, tokenizer, chat template, router
weights, weight files; plus pooling span, layer list, anchor language).

Loading checks the file on every path (`load_priors`, `PriorCache(...)` from Python): the
tensor's shape against ids and layers, finiteness, non-negativity and rows summing to 1; the
one-line `PriorsError` names the file, the example id and the layer. `cache.check` refuses
another model (expert count first, then each fingerprint part) and `cache.check_texts` a
group whose anchor text changed; `SaraTrainer` runs both.

Work is streamed in chunks of groups; each finished chunk is saved in `<output>.partial/`, so
an interrupted run resumes where it stopped (with the same fingerprint and anchor texts;
otherwise the chunks are recomputed). An existing output is refused unless `--overwrite`;
the file is published through `artifacts` (fsync + rename); `<output>.config.json` beside it
is the resolved `PriorsConfig`, and the file's metadata carries `metadata` (versions, command
line, time, world size) as well as the fingerprint.

Under a multi-process launcher (`accelerate launch` on GPUs, `torchrun --nproc_per_node N`
on CPU) the chunks are dealt round-robin to the ranks (`distributed.my_chunks`, chunks shrunk
so every rank gets one); each rank tokenizes and runs only its own, rank 0 sums the ranks'
tables (each row comes from exactly one rank, so it is copied bit for bit) and is the only one
to publish (`artifacts` writes on rank 0 only); the others wait for the file. The output equals a one-process run's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sara_moe.architectures import find_routers, set_router_site
from sara_moe.architectures.fingerprint import fingerprint_diff, model_fingerprint
from sara_moe.data.corpus import CorpusError, encode, read_corpus
from sara_moe.routing import POOLINGS, RouterRecorder, pooled_routing
from sara_moe.runtime import artifacts, distributed
from sara_moe.runtime.loading import DTYPES, check_device_map, load_model_and_tokenizer
from sara_moe.runtime.options import parse_config


@dataclass
class PriorsConfig:
    """Options of `sara priors` (flags, YAML keys and `extract_priors()` keywords are these names)."""

    model: str = field(metadata={"help": "model directory (save_pretrained) or hub id"})
    data: str = field(metadata={"help": "parallel corpus (JSONL or any datasets source)"})
    output: str = field(metadata={"help": "priors file to write (.safetensors)"})
    pooling: str = field(default="all", metadata={"help": "token span pooled", "choices": list(POOLINGS)})
    anchor: str = field(default="en", metadata={"help": "anchor language key of the corpus"})
    batch_size: int = field(default=8, metadata={"help": "anchor texts per forward"})
    max_length: int = field(default=1024, metadata={"help": "tokens kept per sequence (keep_start truncation)"})
    chunk_groups: int = field(default=512, metadata={"help": "groups per resumable chunk"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "dtype the weights are loaded in",
                                                    "choices": sorted(DTYPES)})
    device_map: str | None = field(default=None, metadata={
        "help": "e.g. auto: spread one model over this process's GPUs (a model larger than one GPU); no launcher"})
    router_site: str | None = field(default=None, metadata={
        "help": "router inside a decoder layer where it has several (JetMoE); none = the family default"})
    trust_remote_code: bool = False
    overwrite: bool = field(default=False, metadata={"help": "replace an existing priors file"})


# ----------------------------------------------------------------------------- fingerprint
class PriorsError(ValueError):
    """A priors file that is damaged or does not fit this run; one line naming the file and the fix."""


@dataclass
class PriorCache:
    """A loaded priors file: `table [G, L, E]` float32, row per group id, column per MoE layer."""

    table: torch.Tensor
    ids: list
    layers: list
    fingerprint: dict
    path: str = ""
    text_sha: list | None = None  # per row, artifacts.text_sha of the anchor text it was computed from

    def __post_init__(self):
        validate_table(self.table, self.ids, self.layers, self.path or "priors")
        if self.text_sha is not None and len(self.text_sha) != len(self.ids):
            raise PriorsError(f"{self.path}: {len(self.text_sha)} text hashes for {len(self.ids)} ids; "
                              "rerun `sara priors`")

    def row_of(self) -> dict:
        return {gid: i for i, gid in enumerate(self.ids)}

    def check(self, model, tokenizer, pooling: str, anchor: str) -> None:
        """Raise a one-line PriorsError if this cache was made with another model/tokenizer/pooling."""
        ours = model_fingerprint(model, tokenizer, pooling=pooling, layers=[s.layer for s in find_routers(model)],
                                 anchor=anchor)
        if self.table.shape[-1] != ours["num_experts"]:
            raise PriorsError(f"{self.path}: priors have {self.table.shape[-1]} experts per layer but the model "
                              f"has {ours['num_experts']}; rerun `sara priors` with this model")
        bad = fingerprint_diff(self.fingerprint, ours, keys=list(ours))
        if bad:
            detail = "; ".join(f"{k}: cache {self.fingerprint.get(k)!r} vs run {ours[k]!r}" for k in bad)
            raise PriorsError(f"{self.path}: prior cache does not match this run ({detail}); "
                              "rerun `sara priors` with this model, tokenizer and pooling")

    def check_texts(self, anchor_sha: dict, where: dict | None = None) -> None:
        """Refuse rows whose anchor text changed since extraction; `anchor_sha` maps id -> text_sha."""
        if self.text_sha is None:
            return
        rows = self.row_of()
        for gid, digest in anchor_sha.items():
            if gid in rows and self.text_sha[rows[gid]] != digest:
                place = (where or {}).get(gid, "")
                raise PriorsError(f"{self.path}: group {gid!r}{' (' + place + ')' if place else ''} has another "
                                  "anchor text than when the priors were computed; rerun `sara priors` on this corpus")


def validate_table(table: torch.Tensor, ids: list, layers: list, where: str) -> None:
    """Shape, finiteness and simplex checks; the error names the file, the example id and the layer."""
    if table.dim() != 3 or tuple(table.shape[:2]) != (len(ids), len(layers)) or table.shape[-1] < 2:
        raise PriorsError(f"{where}: priors tensor {tuple(table.shape)} does not match {len(ids)} ids x "
                          f"{len(layers)} layers x experts; rerun `sara priors`")
    checks = [(~torch.isfinite(table), "is not finite (NaN or inf)"), (table < 0, "has negative probabilities"),
              ((table.double().sum(-1, keepdim=True) - 1).abs().expand_as(table) > 1e-3, "does not sum to 1")]
    for bad, what in checks:
        if bool(bad.any()):
            row, col, _ = (int(x) for x in bad.nonzero()[0])
            raise PriorsError(f"{where}: row of example {ids[row]!r}, layer {layers[col]} {what}; "
                              "the file is damaged: rerun `sara priors`")


def load_priors(path) -> PriorCache:
    from safetensors import safe_open

    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such priors file; create it with `sara priors`")
    artifacts.check_safetensors(path)
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
        if "priors" not in fh.keys() or "fingerprint" not in meta:
            raise PriorsError(f"{path}: not a sara priors file (needs tensor 'priors' and metadata 'fingerprint')")
        table = fh.get_tensor("priors")
    try:
        ids, layers = json.loads(meta["ids"]), json.loads(meta["layers"])
        text_sha = json.loads(meta["text_sha"]) if "text_sha" in meta else None
        fp = json.loads(meta["fingerprint"])
    except (KeyError, json.JSONDecodeError) as err:
        raise PriorsError(f"{path}: metadata field {err} is missing or not JSON; rerun `sara priors`") from None
    return PriorCache(table.float(), ids, layers, fp, path, text_sha)


# ----------------------------------------------------------------------------- extraction
def _anchor_sequences(groups, tokenizer, anchor: str, pooling: str, max_length: int):
    for group in groups:
        ids, prompt_len = encode(group.texts[anchor], tokenizer, max_length)
        span = {"all": len(ids), "prompt": prompt_len, "response": len(ids) - prompt_len}[pooling]
        if span == 0:
            raise CorpusError(f"{group.source}:{group.line}: field {anchor!r} of group {group.id!r} has no "
                              f"{pooling} tokens (after truncation to {max_length}); use --pooling all")
        yield ids, prompt_len


def extract_priors(model, data, output, pooling: str = "all", anchor: str = "en", batch_size: int = 8,
                   max_length: int = 1024, chunk_groups: int = 512, tokenizer=None, device: str = "auto",
                   dtype: str = "float32", trust_remote_code: bool = False, progress: bool = True,
                   overwrite: bool = False, device_map: str | None = None, router_site: str | None = None) -> Path:
    """Write the priors file for `data`'s anchor side; returns its path. Resumes a partial run."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    for name, value in (("batch_size", batch_size), ("max_length", max_length), ("chunk_groups", chunk_groups)):
        if value < 1:
            raise ValueError(f"--{name} {value}: must be a positive integer")
    out = Path(output)
    artifacts.refuse_existing(out, overwrite)  # before any work
    config = artifacts.config_dict(PriorsConfig(  # written as <output>.config.json
        model=str(getattr(model, "name_or_path", model)), data=str(data), output=str(output), pooling=pooling,
        anchor=anchor, batch_size=batch_size, max_length=max_length, chunk_groups=chunk_groups, device=device,
        dtype=dtype, device_map=device_map, router_site=router_site, trust_remote_code=trust_remote_code,
        overwrite=overwrite))
    groups = list(read_corpus(data, anchor=anchor))  # one-line errors: missing anchor, duplicate ids, UTF-8
    if not groups:
        raise CorpusError(f"{data}: no groups")
    check_device_map(device_map)
    if isinstance(model, (str, Path)):
        model, tokenizer = load_model_and_tokenizer(str(model), dtype, trust_remote_code=trust_remote_code,
                                                    device_map=device_map)
    if tokenizer is None:
        raise ValueError("extract_priors needs a tokenizer when given a model object")
    if router_site is not None:  # else a loaded model keeps the site it was given (set_router_site)
        set_router_site(model, router_site)
    if getattr(model, "hf_device_map", None):  # spread by accelerate: its hooks move activations between devices
        dev = model.get_input_embeddings().weight.device
    else:
        dev = distributed.device(device)  # under a launcher: joins its process group, this rank's GPU
        model.to(dev)
    model.eval()
    ids = [g.id for g in groups]
    text_sha = [artifacts.text_sha(g.texts[anchor]) for g in groups]
    recorder = RouterRecorder(model)
    layers = recorder.layers
    fp = model_fingerprint(model, tokenizer, pooling=pooling, layers=[int(x) for x in layers], anchor=anchor)
    partial = out.with_name(out.name + ".partial")
    chunk_groups = distributed.chunk_size(len(groups), chunk_groups)  # every rank gets a share
    # the anchor texts are part of the state: an edited corpus never reuses stale chunks
    state = {"fingerprint": fp, "data_hash": artifacts.sha([ids, text_sha]), "chunk_groups": chunk_groups,
             "max_length": max_length}
    for turn in (0, 1):  # rank 0 resets a stale folder first; the others then see it (or their own, unshared)
        if (distributed.rank() == 0) == (turn == 0):
            with artifacts.rank_local():  # the resume folder is each rank's own (shared or not)
                _prepare_partial(partial, state)
        distributed.barrier()
    chunks = [range(i, min(i + chunk_groups, len(groups))) for i in range(0, len(groups), chunk_groups)]
    mine = distributed.my_chunks(len(chunks))  # each rank tokenizes and runs only these
    table = torch.zeros(len(groups), len(layers), fp["num_experts"])
    bar = tqdm(total=sum(len(chunks[i]) for i in mine), desc=f"sara priors (rank {distributed.rank()})"
               if distributed.world_size() > 1 else "sara priors", unit="group", disable=not progress)
    from safetensors.torch import load_file

    for index in mine:
        span = chunks[index]
        shard = partial / f"chunk_{index:06d}.safetensors"
        if shard.is_file():
            table[span.start: span.stop] = load_file(str(shard))["priors"]
            bar.update(len(span))
            continue
        encoded = list(_anchor_sequences(groups[span.start: span.stop], tokenizer, anchor, pooling, max_length))
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # length-sorted batches pad less
        rows = table[span.start: span.stop]
        for start in range(0, len(order), batch_size):
            picked = order[start: start + batch_size]
            rows[picked] = pooled_routing(model, recorder, [encoded[i][0] for i in picked], tokenizer,
                                          [encoded[i][1] for i in picked], pooling)
            bar.update(len(picked))
        with artifacts.rank_local():  # this rank's own resume shard
            artifacts.save_safetensors(shard, {"priors": rows.clone()})
    bar.close()
    table = distributed.sum_to_main(table)  # each row was computed by one rank: the sum is that row, exactly
    if table is not None:  # the rank holding the sums (rank 0)
        validate_table(table, ids, layers, f"{model.__class__.__name__} routing")  # never publish a bad table
    run = {**artifacts.run_metadata(config, device=str(dev)), "world_size": distributed.world_size()}
    metadata = {"ids": json.dumps(ids), "layers": json.dumps(layers), "fingerprint": json.dumps(fp),
                "text_sha": json.dumps(text_sha), "config": json.dumps(config), "metadata": json.dumps(run),
                "format": "sara-priors/1"}
    artifacts.write_json(out.with_name(out.name + ".config.json"), config)  # rank 0 writes, the others skip
    artifacts.save_safetensors(out, {"priors": table}, metadata, overwrite=overwrite)
    if artifacts.writes_here():
        shutil.rmtree(partial, ignore_errors=True)
    artifacts.wait_for_main()  # the other ranks return once the file exists
    return out


def _prepare_partial(partial: Path, state: dict) -> None:
    """The resume folder for `state`: a leftover from another model/corpus/pooling is cleared."""
    if partial.is_dir():
        old = json.loads((partial / "state.json").read_text()) if (partial / "state.json").is_file() else {}
        if old == state:
            return
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(partial / "state.json", state)


def priors_cli(argv=None) -> int:
    cfg = parse_config(PriorsConfig, argv, "sara priors", __doc__.split("\n\n")[0])
    out = extract_priors(**asdict(cfg))
    cache = load_priors(out)
    print(f"priors {tuple(cache.table.shape)} (groups, MoE layers, experts) written to {out}")
    return 0
