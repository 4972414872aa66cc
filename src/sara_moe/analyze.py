"""Cross-lingual routing analysis: where does a language stop using the anchor's experts?

    sara analyze --model PATH_OR_ID --data corpus.jsonl --output-dir runs/analysis [--anchor en] [--langs sw,yo]

    from sara_moe.analyze import analyze
    result = analyze("runs/tiny", "examples/parallel.jsonl", "runs/analysis")

For every group of the parallel corpus, each language's text (and the anchor's) is run
through the frozen model; each MoE layer's router distribution is mean-pooled over the real
tokens (strings tokenized as-is with the tokenizer's special tokens; instruction values
through the chat template, prompt and response together). Per language and MoE layer:

- `js_pair_mean`: mean over groups of JS(pooled language ‖ pooled anchor) — what SARA trains on;
- `js_corpus`: JS between the corpus-mean distributions (Bandarkar et al.'s "expert importance");
- `js_norm`: `js_corpus / (log E − mean entropy of the two corpus-mean distributions)`;
- `topk_overlap`: mean over groups of the Jaccard overlap of the k most-used experts
  (k = the model's experts per token unless `--topk`).

`recommended_layers` is `architectures.middle_band`: the paper's band (7–34 of 48) scaled to
the model's depth. Only pooled `[layers, experts]` vectors are kept per group, so memory does
not grow with sequence length; groups are batched by length and padded rows are masked (and
given positions that skip the pads), so batched results equal unbatched ones.
Outputs: analysis.json, analysis.csv, routing_js_heatmap.png, routing_js_by_layer.png,
config.json — published through `artifacts` (staged beside the output dir, fsynced, renamed;
`analysis.json` last). An existing analysis.json is refused before any work unless `--overwrite`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from . import artifacts
from . import divergence as D
from .architectures import find_routers, middle_band
from .corpus import CorpusError, corpus_languages, encode, read_corpus
from .loading import DTYPES, load_model_and_tokenizer
from .routing import RouterRecorder, pooled_routing

@dataclass
class AnalyzeConfig:
    model: str
    data: str
    output_dir: str
    anchor: str = "en"
    langs: list | None = None
    batch_size: int = 8
    max_length: int = 512
    device: str = "auto"
    dtype: str = "float32"
    topk: int | None = None
    overwrite: bool = False
    trust_remote_code: bool = False


def _select_langs(groups, anchor: str, langs: list | None) -> list[str]:
    available = [lang for lang in corpus_languages(groups) if lang != anchor]
    if langs is None:
        if not available:
            raise CorpusError(f"corpus has no language besides the anchor {anchor!r}")
        return available
    unknown = [lang for lang in langs if lang not in available]
    if unknown:
        raise CorpusError(f"--langs {','.join(unknown)}: not in the corpus (languages besides the anchor: "
                          f"{','.join(available) or 'none'})")
    return list(langs)


def analyze(model, data, output_dir, anchor: str = "en", langs: list | None = None, batch_size: int = 8,
            max_length: int = 512, device: str = "auto", dtype: str = "float32", topk: int | None = None,
            overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    """Run the routing analysis and write its outputs; returns the analysis.json dict."""
    config = AnalyzeConfig(str(model), str(data), str(output_dir), anchor, langs, batch_size, max_length,
                           device, dtype, topk, overwrite, trust_remote_code)
    for name, value in (("batch-size", batch_size), ("max-length", max_length), ("topk", topk or 1)):
        if value < 1:
            raise ValueError(f"--{name} {value}: must be a positive integer")
    out = Path(output_dir)
    artifacts.claim(out, "analysis.json", overwrite)  # before the model runs
    groups = list(read_corpus(data, anchor=anchor))
    if not groups:
        raise CorpusError(f"{data}: no groups")
    langs = _select_langs(groups, anchor, langs)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    net, tokenizer = load_model_and_tokenizer(str(model), dtype, device, trust_remote_code)
    sites = find_routers(net)
    layers = [s.layer for s in sites]
    k = topk or int(getattr(net.config, "num_experts_per_tok", 2))

    encoded = {lang: {} for lang in [anchor, *langs]}
    for group in groups:
        for lang in encoded:
            if lang in group.texts:
                encoded[lang][group.id] = encode(group.texts[lang], tokenizer, max_length)[0]
    order = sorted(range(len(groups)), key=lambda i: len(encoded[anchor][groups[i].id]))

    sums = {lang: {"js": 0.0, "overlap": 0.0, "n": 0, "lang_mass": 0.0, "anchor_mass": 0.0} for lang in langs}
    side = getattr(tokenizer, "padding_side", "right")
    recorder = RouterRecorder(net)
    for start in tqdm(range(0, len(order), batch_size), desc="analyze", unit="batch"):
        batch = [groups[i] for i in order[start:start + batch_size]]
        anchor_pooled = pooled_routing(net, recorder, [encoded[anchor][g.id] for g in batch],
                                       tokenizer.pad_token_id, side=side)
        for lang in langs:
            rows = [r for r, g in enumerate(batch) if g.id in encoded[lang]]
            if not rows:
                continue
            lang_pooled = pooled_routing(net, recorder, [encoded[lang][batch[r].id] for r in rows],
                                         tokenizer.pad_token_id, side=side)
            paired = anchor_pooled[rows]
            acc = sums[lang]
            acc["js"] = acc["js"] + D.js_divergence(lang_pooled, paired).sum(0)
            acc["overlap"] = acc["overlap"] + D.topk_overlap(lang_pooled, paired, k).sum(0)
            acc["lang_mass"] = acc["lang_mass"] + lang_pooled.sum(0)
            acc["anchor_mass"] = acc["anchor_mass"] + paired.sum(0)
            acc["n"] += len(rows)

    metrics = {name: {} for name in ("js_pair_mean", "js_corpus", "js_norm", "topk_overlap")}
    counts = {}
    for lang, acc in sums.items():
        n = acc["n"]
        if n == 0:
            raise CorpusError(f"{data}: no group has both {anchor!r} and {lang!r}")
        lang_mean, anchor_mean = acc["lang_mass"] / n, acc["anchor_mass"] / n
        metrics["js_pair_mean"][lang] = (acc["js"] / n).tolist()
        metrics["js_corpus"][lang] = D.js_divergence(lang_mean, anchor_mean).tolist()
        metrics["js_norm"][lang] = D.normalized_js(lang_mean, anchor_mean).tolist()
        metrics["topk_overlap"][lang] = (acc["overlap"] / n).tolist()
        counts[lang] = n
    result = {
        "model": str(model), "data": str(data), "anchor": anchor, "langs": langs,
        "moe_layers": layers, "num_layers": int(net.config.num_hidden_layers),
        "num_experts": int(anchor_pooled.shape[-1]), "topk": k, "scoring": sites[0].scoring,
        "num_examples": len(groups), "num_pairs": counts, "metrics": metrics,
        "recommended_layers": middle_band(net, layers),
        "recommended_rule": "MoE layers i with 7/48 <= i/num_layers < 35/48 (the paper's 7-34 of 48, scaled)",
        "ln2": math.log(2),
    }
    result["metadata"] = artifacts.run_metadata(asdict(config), device=device)
    _write_outputs(out, result, asdict(config), overwrite)
    return result


def _write_outputs(out: Path, result: dict, config: dict, overwrite: bool) -> None:
    with artifacts.publishing(out, overwrite, primary="analysis.json") as tmp:
        (tmp / "analysis.json").write_text(json.dumps(result, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        with open(tmp / "analysis.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            names = list(result["metrics"])
            writer.writerow(["lang", "layer", *names])
            for lang in result["langs"]:
                for i, layer in enumerate(result["moe_layers"]):
                    writer.writerow([lang, layer, *(f"{result['metrics'][m][lang][i]:.6g}" for m in names)])
        _plot(tmp, result)


def _plot(folder: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, langs = result["moe_layers"], result["langs"]
    values = [result["metrics"]["js_pair_mean"][lang] for lang in langs]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(layers) + 2), max(2.5, 0.45 * len(langs) + 1.5)))
    image = ax.imshow(values, aspect="auto", cmap="magma_r", vmin=0)
    ax.set_xticks(range(len(layers)), [str(x) for x in layers])
    ax.set_yticks(range(len(langs)), langs)
    ax.set_xlabel("decoder layer (MoE layers only)")
    ax.set_title(f"routing JS to {result['anchor']!r} (mean over parallel pairs)")
    fig.colorbar(image, ax=ax, label="JS (nats)")
    fig.tight_layout()
    fig.savefig(folder / "routing_js_heatmap.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for lang, row in zip(langs, values):
        ax.plot(layers, row, marker="o", label=lang)
    band = result["recommended_layers"]
    ax.axvspan(min(band) - 0.5, max(band) + 0.5, color="tab:green", alpha=0.1, label="recommended band")
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("JS to anchor (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "routing_js_by_layer.png", dpi=120)
    plt.close(fig)


def analyze_cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sara analyze", description="Cross-lingual routing divergence per MoE layer.")
    parser.add_argument("--model", required=True, help="model directory or hub id")
    parser.add_argument("--data", required=True, help="parallel corpus (JSONL or any datasets source)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--anchor", default="en")
    parser.add_argument("--langs", default=None, help="comma-separated languages (default: all but the anchor)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--topk", type=int, default=None, help="k for top-k overlap (default: experts per token)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    langs = [x for x in args.langs.split(",") if x] if args.langs else None
    result = analyze(args.model, args.data, args.output_dir, args.anchor, langs, args.batch_size, args.max_length,
                     args.device, args.dtype, args.topk, args.overwrite, args.trust_remote_code)
    print(f"analysis of {len(result['langs'])} language(s) x {len(result['moe_layers'])} MoE layers "
          f"written to {args.output_dir}; recommended layers {result['recommended_layers']}")
    return 0
