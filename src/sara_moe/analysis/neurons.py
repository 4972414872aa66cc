"""Language neurons inside experts: activation probability per language of every MLP neuron, classified.

    sara neurons --model PATH --data corpus.jsonl --output_dir runs/neurons [--langs en,sw] [--ablate]
    sara neurons --compare runs/neurons_base runs/neurons_sft runs/neurons_sara --output_dir runs/neurons_cmp
    sara steer deactivate --model PATH --source runs/neurons/neurons.json --langs sw --output off_sw.json

    from sara_moe.analysis.neurons import NeuronsConfig, neurons
    result = neurons(NeuronsConfig(model="runs/tiny", data="examples/parallel.jsonl", output_dir="runs/neurons"))

Every language's text of every parallel group runs once through the frozen model, rendered and
padded as `sara analyze` does (`corpus.encode`, `loading.pad_batch`, positions counting real tokens
only). For every MoE layer, every routed expert and every intermediate neuron of its gated MLP,
`act_count` counts the real tokens of each language *dispatched to that expert* on which the neuron
fires (its gate activation is > 0: `architectures.experts.fires`), and `token_count` the tokens each
expert got; shared experts and dense MLP layers are counted over every real token. The experts are
read with forward hooks (`architectures.experts.watch_routed`: transformers 5's fused experts and
JetMoE's sorted ones), never by patching model code. Only the counts are kept (O(layers × experts ×
neurons × languages)), so memory does not grow with the corpus. A family whose experts are neither
is refused in one line naming it. One process only: under a launcher the verb refuses in one line.

Activation probability = act_count / token_count (0 where an expert got fewer than `min_tokens`
tokens of a language). `neuron_classes` classifies the routed neurons (all MoE layers pooled) and,
separately, the shared and the dense ones, with LNP and LAPE (thresholds as fields; which default
comes from which paper is in `neuron_classes`).

Outputs in `--output_dir` (through `artifacts`, `neurons.json` last; an existing one is refused
unless `--overwrite`):
- `neurons.safetensors`: `act_count [moe_layers, experts, neurons, langs]`, `token_count
  [moe_layers, experts, langs]` (int64), and per shared/dense site `<kind>.layer_<L>.act_count
  [neurons, langs]`, `<kind>.layer_<L>.token_count [langs]`; metadata `format`, `langs` (the
  language order, JSON), `moe_layers`, `sites` (JSON).
- `neurons.json`: languages, layers, tokens, thresholds and per method (`lnp`, `lape`): `counts`
  (per kind, per type: `[layer][expert][lang]` neurons of that type serving the language),
  `specific_share` (routed: specific neurons / neurons per expert and language), `totals`, and
  `neurons[lang][type]` = `[layer, kind, expert, neuron]` lists (what `sara steer deactivate`
  reads); `ablation` with `--ablate`.
- `neurons_map.png`: per MoE layer the routing map (share of each language's tokens per expert,
  `sara analyze`'s dispatch map) beside the share of LNP language-specific neurons per expert.
- `neurons_config.json`: the resolved `NeuronsConfig`.

**Ablation** (`--ablate`): for each language X, X's specific neurons (`--ablate_method`) are zeroed
(`steering.deactivate`) and every language's perplexity is measured on `--ablate_data` (default
`--data`): `ablation.rows[X].ppl[Y]` and `ratio[Y]` = ppl / base ppl. LAPE's check is that the
diagonal (X on X) rises far more than the rest.

**Compare** (`--compare BASE RUN ...`, folders of earlier runs on the same model and languages):
`neurons_compare.json` (and `neurons_compare_config.json`) with, per method, each type's counts per
layer band (early / middle = `architectures.middle_band` / late) and language in the base and each run,
their change, each language's overlap with the anchor's language neurons and how many of its specific
neurons a run keeps (`neuron_classes.compare`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sara_moe.analysis import neuron_classes as C
from sara_moe.architectures import experts as X
from sara_moe.architectures import num_hidden_layers, set_router_site
from sara_moe.data.corpus import CorpusError, encode, read_corpus
from sara_moe.routing import position_ids_from_mask
from sara_moe.runtime import artifacts, distributed
from sara_moe.runtime.loading import DTYPES, load_model_and_tokenizer, pad_batch
from sara_moe.runtime.options import parse_config

FORMAT = "sara-moe-neurons/1"


@dataclass
class NeuronsConfig:
    """Options of `sara neurons` (flags and YAML keys are these names)."""

    output_dir: str = field(metadata={"help": "folder for neurons.safetensors, neurons.json, the map, the config"})
    model: str | None = field(default=None, metadata={"help": "model directory or hub id (not with --compare)"})
    data: str | None = field(default=None, metadata={"help": "parallel corpus (JSONL groups; not with --compare)"})
    compare: list[str] | None = field(default=None, metadata={
        "help": "BASE RUN ...: `sara neurons` output folders (or neurons.json files) to compare, base first"})
    anchor: str = field(default="en", metadata={"help": "language the --compare overlaps are taken with"})
    langs: list[str] | None = field(default=None, metadata={"help": "languages counted; none = all in the corpus"})
    batch_size: int = field(default=8, metadata={"help": "texts per forward"})
    max_length: int = field(default=512, metadata={"help": "tokens kept per text"})
    chunk_groups: int = field(default=1024, metadata={"help": "groups read, sorted and batched at a time"})
    min_tokens: int = field(default=1, metadata={
        "help": "an expert's probabilities for a language count only from this many of its tokens (else 0)"})
    lape_top_rate: float = field(default=0.01, metadata={"help": "LAPE: share of lowest-entropy neurons kept"})
    lape_filter_rate: float = field(default=0.95, metadata={"help": "LAPE: quantile a neuron must pass somewhere"})
    lape_activation_bar_ratio: float = field(default=0.95, metadata={"help": "LAPE: quantile assigning languages"})
    lnp_top_rate: float = field(default=0.01, metadata={"help": "LNP: share of lowest-score neurons kept"})
    lnp_lambda: float = field(default=0.0, metadata={"help": "LNP: weight of the max probability in the score"})
    lnp_activation_bar_ratio: float = field(default=0.95, metadata={"help": "LNP: quantile assigning languages"})
    ablate: bool = field(default=False, metadata={"help": "zero each language's specific neurons, measure perplexities"})
    ablate_data: str | None = field(default=None, metadata={"help": "corpus for the ablation; none = --data"})
    ablate_method: str = field(default="lnp", metadata={"help": "classification ablated", "choices": ["lnp", "lape"]})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "dtype the weights are loaded in", "choices": sorted(DTYPES)})
    router_site: str | None = field(default=None, metadata={"help": "router where a layer has several; none = default"})
    trust_remote_code: bool = False
    overwrite: bool = field(default=False, metadata={"help": "replace an existing neurons.json"})


class NeuronCounter:
    """Hooks counting, per site, expert, neuron and language, the tokens on which a neuron fires."""

    def __init__(self, model, langs: list[str]):
        self.model, self.langs = model, list(langs)
        sites = X.mlp_sites(model)
        self.routed = [s for s in sites if s.kind == X.ROUTED]
        self.other = [s for s in sites if s.kind != X.ROUTED]
        shapes = {(s.num_experts, s.num_neurons) for s in self.routed}
        if len(shapes) > 1:
            raise ValueError(f"MoE layers differ in experts × neurons {sorted(shapes)}; sara neurons needs one shape")
        experts, width = shapes.pop()
        device = next(model.parameters()).device
        k = len(self.langs)
        self.act = torch.zeros(len(self.routed), experts, width, k, dtype=torch.int64, device=device)
        self.tokens = torch.zeros(len(self.routed), experts, k, dtype=torch.int64, device=device)
        self.other_act = {s.name: torch.zeros(s.num_neurons, k, dtype=torch.int64, device=device) for s in self.other}
        self.other_tokens = {s.name: torch.zeros(k, dtype=torch.int64, device=device) for s in self.other}
        self.token_lang: torch.Tensor | None = None
        self._handles: list = []

    def _routed(self, position):
        def count(expert, tokens, pre):
            ids = self.token_lang.to(tokens.device)[tokens]
            real = ids >= 0
            if not real.any():
                return
            on = X.fires(self.routed[position], pre[real]).long()
            per_lang = torch.zeros(len(self.langs), on.shape[-1], dtype=torch.int64, device=on.device)
            self.act[position, expert] += per_lang.index_add_(0, ids[real], on).t()
            self.tokens[position, expert] += torch.bincount(ids[real], minlength=len(self.langs))
        return count

    def _gate_hook(self, site):
        def hook(module, args, output):
            pre = output.reshape(-1, output.shape[-1])
            ids = self.token_lang.to(pre.device)
            real = ids >= 0
            on = X.fires(site, pre[real]).long()
            per_lang = torch.zeros(len(self.langs), on.shape[-1], dtype=torch.int64, device=on.device)
            self.other_act[site.name] += per_lang.index_add_(0, ids[real], on).t()
            self.other_tokens[site.name] += torch.bincount(ids[real], minlength=len(self.langs))
        return hook

    def __enter__(self):
        for position, site in enumerate(self.routed):
            self._handles += X.watch_routed(site, self._routed(position))
        for site in self.other:
            self._handles.append(site.module.gate_proj.register_forward_hook(self._gate_hook(site)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def count(self, tokenizer, sequences: list[list[int]], lang: int):
        """One forward over a batch of one language's token ids."""
        ids, mask = pad_batch(tokenizer, sequences, side="right")
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        self.token_lang = torch.where(mask.reshape(-1) > 0, lang, -1)
        self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
        return int(mask.sum())


def survey_langs(data, langs: list[str] | None) -> tuple[list[str], int]:
    """(languages in order of first appearance, or `langs` checked against the corpus; number of groups)."""
    seen: dict[str, int] = {}
    groups = 0
    for group in read_corpus(data):
        groups += 1
        for lang in group.texts:
            seen[lang] = seen.get(lang, 0) + 1
    if langs:
        missing = [lang for lang in langs if lang not in seen]
        if missing:
            raise CorpusError(f"{data}: no text in {missing[0]!r}; its languages are {sorted(seen)}")
        return list(langs), groups
    if len(seen) < 2:
        raise CorpusError(f"{data}: needs texts in at least two languages to tell language neurons apart")
    return list(seen), groups


def language_batches(data, tokenizer, langs, batch_size: int, max_length: int, chunk_groups: int):
    """(language index, token id lists) batches: chunks of groups, per language sorted by length."""
    def batches(chunk):
        for index, lang in enumerate(langs):
            seqs = sorted((encode(g.texts[lang], tokenizer, max_length)[0] for g in chunk if lang in g.texts), key=len)
            seqs = [s for s in seqs if s]
            for start in range(0, len(seqs), batch_size):
                yield index, seqs[start:start + batch_size]

    chunk = []
    for group in read_corpus(data):
        chunk.append(group)
        if len(chunk) == chunk_groups:
            yield from batches(chunk)
            chunk = []
    if chunk:
        yield from batches(chunk)


def probabilities(act: torch.Tensor, tokens: torch.Tensor, min_tokens: int) -> torch.Tensor:
    """act_count / token_count over the neuron axis (second to last); 0 where too few tokens."""
    enough = tokens >= max(min_tokens, 1)
    probs = act.double() / tokens.clamp_min(1).double().unsqueeze(-2)
    return probs * enough.unsqueeze(-2)


def classify_counts(counter_tensors: dict, sites: list[dict], langs: list[str], cfg: NeuronsConfig) -> dict:
    """The classification of every kind (routed pooled over layers; shared; dense) per method."""
    thresholds = C.Thresholds(**{f.name: getattr(cfg, f.name) for f in fields(C.Thresholds)})
    k = len(langs)
    moe_layers = [s["layer"] for s in sites if s["kind"] == X.ROUTED]
    out = {method: {"counts": {}, "neurons": {lang: {t: [] for t in C.TYPES} for lang in langs}, "bars": {}}
           for method in ("lnp", "lape")}
    groups = [(X.ROUTED, moe_layers, counter_tensors["act_count"], counter_tensors["token_count"])]
    for kind in (X.SHARED, X.DENSE):
        members = [s for s in sites if s["kind"] == kind]
        if members:
            widths = {s["num_neurons"] for s in members}
            if len(widths) == 1:
                act = torch.stack([counter_tensors[f"{kind}.layer_{s['layer']}.act_count"] for s in members])[:, None]
                tok = torch.stack([counter_tensors[f"{kind}.layer_{s['layer']}.token_count"] for s in members])[:, None]
                groups.append((kind, [s["layer"] for s in members], act, tok))
    for kind, layers, act, tok in groups:
        probs = probabilities(act, tok, cfg.min_tokens)  # [layers, experts, neurons, K]
        shape = probs.shape[:2]
        result = C.classify(probs.reshape(-1, k), langs, thresholds)
        for method, found in result.items():
            counts = C.type_counts(found["type"], found["langs"], tuple(shape))
            out[method]["counts"][kind] = {t: c.tolist() for t, c in counts.items()}
            out[method]["bars"][kind] = found["bars"]
            if kind == X.ROUTED:
                out[method]["specific_share"] = (counts["specific"].double() / probs.shape[2]).tolist()
            width = probs.shape[2]
            for flat in torch.nonzero(found["type"] > 0).reshape(-1).tolist():
                layer_pos, rest = divmod(flat, shape[1] * width)
                expert, neuron = divmod(rest, width)
                name = C.TYPES[int(found["type"][flat]) - 1]
                for lang_index in torch.nonzero(found["langs"][flat]).reshape(-1).tolist():
                    out[method]["neurons"][langs[lang_index]][name].append([layers[layer_pos], kind, expert, neuron])
    for method in out.values():
        method["totals"] = {lang: {t: len(v) for t, v in lists.items()} for lang, lists in method["neurons"].items()}
    return out


@torch.no_grad()
def perplexities(model, tokenizer, data, langs, batch_size: int, max_length: int, chunk_groups: int) -> dict:
    """{lang: exp(mean next-token NLL over its real tokens)} on `data`'s texts."""
    device = next(model.parameters()).device
    nll = torch.zeros(len(langs), dtype=torch.float64)
    count = torch.zeros(len(langs), dtype=torch.float64)
    for index, seqs in language_batches(data, tokenizer, langs, batch_size, max_length, chunk_groups):
        ids, mask = pad_batch(tokenizer, seqs, side="right")
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        keep = (mask[:, 1:] * mask[:, :-1]).float()
        nll[index] += float((loss * keep).sum())
        count[index] += float(keep.sum())
    return {lang: math.exp(nll[i] / count[i]) if count[i] else None for i, lang in enumerate(langs)}


def ablation(model, tokenizer, result: dict, cfg: NeuronsConfig, data) -> dict:
    """Perplexity of every language with each language's specific neurons zeroed, beside the base."""
    from sara_moe.steering import deactivate

    langs = result["langs"]
    args = (cfg.batch_size, cfg.max_length, cfg.chunk_groups)
    base = perplexities(model, tokenizer, data, langs, *args)
    rows = {}
    for lang in tqdm(langs, desc="ablation"):
        lists = result["classification"][cfg.ablate_method]["neurons"][lang]["specific"]
        if not lists:
            rows[lang] = {"neurons": 0, "ppl": None, "ratio": None}
            continue
        spec = deactivate.from_neurons(result, model, [lang], cfg.ablate_method, "specific")
        with deactivate.deactivation(model, spec):
            ppl = perplexities(model, tokenizer, data, langs, *args)
        rows[lang] = {"neurons": len(lists), "ppl": ppl,
                      "ratio": {y: (ppl[y] / base[y] if ppl[y] and base[y] else None) for y in langs}}
    return {"method": cfg.ablate_method, "data": str(data), "base": base, "rows": rows,
            "rule": "rows: the language whose specific neurons are zeroed; columns: the language measured"}


def plot_map(path, result: dict, token_count: torch.Tensor) -> None:
    """Per MoE layer: each language's share of tokens per expert beside the share of specific neurons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, langs = result["moe_layers"], result["langs"]
    share = token_count.double() / token_count.sum(1, keepdim=True).clamp_min(1).double()
    specific = torch.tensor(result["classification"]["lnp"]["specific_share"])
    fig, axes = plt.subplots(len(layers), 2, figsize=(2 + 0.5 * len(langs) * 2, 0.8 + 0.25 * share.shape[1] * len(layers)),
                             squeeze=False)
    for row, layer in enumerate(layers):
        for col, (values, title) in enumerate([(share[row], "routing share"), (specific[row], "specific neurons")]):
            ax = axes[row][col]
            image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", vmin=0)
            ax.set_title(f"layer {layer}: {title}", fontsize=8)
            ax.set_xticks(range(len(langs)), langs, fontsize=7)
            ax.set_ylabel("expert", fontsize=7)
            fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def count_neurons(model, tokenizer, cfg, langs: list[str], progress_total: int | None = None):
    """Stream `cfg.data` through `model` by language; `(counter, sites, tensors, tokens per language)`,
    `tensors` in the neurons.safetensors layout. A progress bar when `progress_total` is given."""
    counter = NeuronCounter(model, langs)  # refuses families it cannot read before any forward
    total = torch.zeros(len(langs), dtype=torch.int64)
    with counter, tqdm(total=progress_total, desc="neurons", unit="text", disable=progress_total is None) as bar:
        for index, seqs in language_batches(cfg.data, tokenizer, langs, cfg.batch_size, cfg.max_length,
                                            cfg.chunk_groups):
            total[index] += counter.count(tokenizer, seqs, index)
            bar.update(len(seqs))
    sites = [{"name": s.name, "layer": s.layer, "kind": s.kind, "num_experts": s.num_experts,
              "num_neurons": s.num_neurons} for s in counter.routed + counter.other]
    tensors = {"act_count": counter.act.cpu(), "token_count": counter.tokens.cpu()}
    for site in counter.other:
        tensors[f"{site.kind}.layer_{site.layer}.act_count"] = counter.other_act[site.name].cpu()
        tensors[f"{site.kind}.layer_{site.layer}.token_count"] = counter.other_tokens[site.name].cpu()
    return counter, sites, tensors, total


def neurons(cfg: NeuronsConfig) -> dict:
    """Count, classify (and with `ablate` ablate) the language neurons of `cfg.model`; write the outputs.
    With `compare`, compare earlier outputs instead (`compare_runs`)."""
    if distributed.launched():
        raise ValueError("sara neurons runs in one process: start it without torchrun / accelerate launch")
    if cfg.compare:
        return C.compare_runs(cfg, FORMAT)
    if cfg.model is None or cfg.data is None:
        raise ValueError("sara neurons: --model and --data are required (or --compare BASE RUN ...)")
    if cfg.batch_size < 1 or cfg.max_length < 1 or cfg.chunk_groups < 1:
        raise ValueError("--batch_size, --max_length and --chunk_groups must be positive")
    artifacts.claim(cfg.output_dir, "neurons.json", cfg.overwrite)
    langs, num_groups = survey_langs(cfg.data, cfg.langs)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    set_router_site(model, cfg.router_site)
    model.eval()
    counter, sites, tensors, total = count_neurons(model, tokenizer, cfg, langs, num_groups * len(langs))
    config = artifacts.config_dict(cfg)
    result = {"format": FORMAT, "model": cfg.model, "data": cfg.data, "langs": langs,
              "moe_layers": [s.layer for s in counter.routed], "num_layers": num_hidden_layers(model),
              "num_experts": int(counter.act.shape[1]),
              "num_neurons": int(counter.act.shape[2]), "sites": sites, "num_groups": num_groups,
              "tokens": {lang: int(total[i]) for i, lang in enumerate(langs)},
              "thresholds": {f.name: getattr(cfg, f.name) for f in fields(C.Thresholds)},
              "min_tokens": cfg.min_tokens, "definitions": C.__doc__.split("\n\n", 2)[2],
              "classification": classify_counts(tensors, sites, langs, cfg)}
    if cfg.ablate:
        result["ablation"] = ablation(model, tokenizer, result, cfg, cfg.ablate_data or cfg.data)
    result["metadata"] = artifacts.run_metadata(config, device=cfg.device)
    from safetensors.torch import save_file

    metadata = {"format": FORMAT, "langs": json.dumps(langs), "moe_layers": json.dumps(result["moe_layers"]),
                "sites": json.dumps(sites)}
    with artifacts.publishing(cfg.output_dir, cfg.overwrite, primary="neurons.json") as staging:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / "neurons.safetensors"), metadata=metadata)
        plot_map(staging / "neurons_map.png", result, counter.tokens.cpu())
        (staging / "neurons_config.json").write_text(json.dumps(config, indent=2))
        (staging / "neurons.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    artifacts.wait_for_main()
    return result


def neurons_cli(argv=None) -> int:
    cfg = parse_config(NeuronsConfig, argv, "sara neurons", __doc__.split("\n\n")[0])
    result = neurons(cfg)
    if cfg.compare:
        for label, run in result["methods"]["lnp"]["runs"].items():
            delta = {lang: sum(band[lang] for band in run["delta"]["specific"].values()) for lang in result["langs"]}
            print(f"{label}: LNP language-specific neurons vs base " + ", ".join(f"{k} {v:+d}" for k, v in delta.items()))
        print(f"comparison written to {Path(cfg.output_dir) / 'neurons_compare.json'}")
        return 0
    totals = result["classification"]["lnp"]["totals"]
    print(f"neurons of {len(result['moe_layers'])} MoE layers x {result['num_experts']} experts x "
          f"{result['num_neurons']} neurons written to {cfg.output_dir}; LNP language-specific: "
          + ", ".join(f"{lang} {t['specific']}" for lang, t in totals.items()))
    if "ablation" in result:
        for lang, row in result["ablation"]["rows"].items():
            if row["ratio"]:
                print(f"  zero {lang}-specific ({row['neurons']}): ppl x " +
                      ", ".join(f"{y} {r:.3f}" for y, r in row["ratio"].items()))
    return 0
