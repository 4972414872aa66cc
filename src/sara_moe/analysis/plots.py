"""Files of a `sara analyze` run: analysis.json, analysis.csv, analyze_config.json and the maps as PNGs.

    from sara_moe.analysis.plots import write_analysis, plot_maps
    write_analysis("runs/analysis", result, config, overwrite=False)   # published through artifacts
    plot_maps(folder, result)   # also used by `sara report` to show an analysis' maps

Plots (each reads only analysis.json's numbers):
- routing_js_heatmap.png, routing_js_by_layer.png: js_pair_mean per language and MoE layer,
  with the recommended band;
- routing_entropy.png: mean routing entropy per language (anchor included) and layer;
- all_pairs_js.png: language × language js_pair_mean, one panel per layer band;
- expert_language_map.png: each language's share of dispatched slots per expert, for up to
  four MoE layers, with the expert classes, and IG(L;E)/H(L) per layer;
- hidden_alignment.png: MEXA score and mean-pooled cosine per decoder layer, beside routing
  similarity (1 − js_pair_mean / ln 2) on the MoE layers.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from sara_moe.runtime import artifacts


def write_analysis(out, result: dict, config: dict, overwrite: bool, plots: bool = True,
                   other_sites: dict | None = None) -> None:
    """Publish one analysis folder: analyze_config.json, analysis.csv, the PNGs, analysis.json last;
    `other_sites` ({router site: its analysis}) go to router_sites/<site>/ in the same publication."""
    with artifacts.publishing(Path(out), overwrite, primary="analysis.json") as tmp:
        for site, other in (other_sites or {}).items():
            _write_folder(tmp / "router_sites" / site, other, {**config, "router_site": site}, plots)
        _write_folder(tmp, result, config, plots)


def _write_folder(folder: Path, result: dict, config: dict, plots: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "analyze_config.json").write_text(json.dumps(config, indent=2))
    write_csv(folder / "analysis.csv", result)
    if plots:  # many small analyses (an experiment's runs) skip the PNGs
        plot_maps(folder, result)
    (folder / "analysis.json").write_text(json.dumps(result, indent=2))


def write_csv(path, result: dict) -> None:
    """analysis.csv: one row per (language, MoE layer), one column per metric."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        names = list(result["metrics"])
        writer.writerow(["lang", "layer", *names])
        for lang in result["langs"]:
            for i, layer in enumerate(result["moe_layers"]):
                writer.writerow([lang, layer, *(f"{result['metrics'][m][lang][i]:.6g}" for m in names)])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path.name


def plot_maps(folder, result: dict, prefix: str = "") -> list[str]:
    """Write every map of `result` (an analysis.json dict) into `folder`; returns the file names."""
    folder = Path(folder)
    names = [_js_plots(folder, result, prefix)]
    names.append(_entropy(folder, result, prefix))
    if "all_pairs_js" in result:
        names.append(_all_pairs(folder, result, prefix))
    if "experts" in result:
        names.append(_experts(folder, result, prefix))
    if result.get("hidden_alignment", {}).get("mexa") or result.get("hidden_alignment", {}).get("cosine"):
        names.append(_hidden(folder, result, prefix))
    return [n for n in names if n]


def _js_plots(folder: Path, result: dict, prefix: str) -> str:
    plt = _plt()
    layers, langs = result["moe_layers"], result["langs"]
    values = [result["metrics"]["js_pair_mean"][lang] for lang in langs]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(layers) + 2), max(2.5, 0.45 * len(langs) + 1.5)))
    image = ax.imshow(values, aspect="auto", cmap="magma_r", vmin=0)
    ax.set_xticks(range(len(layers)), [str(x) for x in layers])
    ax.set_yticks(range(len(langs)), langs)
    ax.set_xlabel("decoder layer (MoE layers only)")
    ax.set_title(f"js_pair_mean to {result['anchor']!r} ({result.get('routing', 'dense')} routing)")
    fig.colorbar(image, ax=ax, label="JS (nats)")
    _save(fig, folder / f"{prefix}routing_js_heatmap.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for lang, row in zip(langs, values):
        ax.plot(layers, row, marker="o", label=lang)
    band = result["recommended_layers"]
    ax.axvspan(min(band) - 0.5, max(band) + 0.5, color="tab:green", alpha=0.1, label="recommended band")
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("js_pair_mean to anchor (nats)")
    ax.legend(fontsize=8)
    return _save(fig, folder / f"{prefix}routing_js_by_layer.png")


def _entropy(folder: Path, result: dict, prefix: str) -> str | None:
    entropy = result.get("routing_entropy")
    if not entropy:
        return None
    plt = _plt()
    layers = result["moe_layers"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for lang, row in entropy.items():
        ax.plot(layers, row, marker="o", label=lang, linestyle="--" if lang == result["anchor"] else "-")
    ax.axhline(math.log(result["num_experts"]), color="grey", linewidth=0.8, label="log E (uniform)")
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("mean routing entropy (nats)")
    ax.legend(fontsize=8)
    return _save(fig, folder / f"{prefix}routing_entropy.png")


def _all_pairs(folder: Path, result: dict, prefix: str) -> str:
    plt = _plt()
    pairs = result["all_pairs_js"]
    langs, bands = pairs["langs"], pairs["by_band"]
    fig, axes = plt.subplots(1, len(bands), figsize=(3.2 * len(bands) + 1, 3.2), squeeze=False)
    top = max((v for m in bands.values() for row in m for v in row), default=0) or 1e-9
    for ax, (name, matrix) in zip(axes[0], bands.items()):
        image = ax.imshow(matrix, cmap="magma_r", vmin=0, vmax=top)
        members = pairs["bands"][name]
        ax.set_title(f"{name}: layers {members[0]}-{members[-1]}", fontsize=9)
        ax.set_xticks(range(len(langs)), langs, fontsize=8)
        ax.set_yticks(range(len(langs)), langs, fontsize=8)
        for a in range(len(langs)):
            for b in range(len(langs)):
                ax.text(b, a, f"{matrix[a][b]:.3f}", ha="center", va="center", fontsize=6, color="tab:blue")
    fig.colorbar(image, ax=axes[0].tolist(), label="js_pair_mean (nats)")
    fig.suptitle("all-pairs routing JS per layer band", fontsize=10)
    fig.savefig(folder / f"{prefix}all_pairs_js.png", dpi=110)
    plt.close(fig)
    return f"{prefix}all_pairs_js.png"


def _experts(folder: Path, result: dict, prefix: str) -> str:
    import numpy as np

    plt = _plt()
    experts, layers = result["experts"], result["moe_layers"]
    counts = np.asarray(experts["counts"], dtype=float)  # [n, L, E]
    shares = counts / np.clip(counts.sum(-1, keepdims=True), 1e-12, None)
    picks = sorted({round(i * (len(layers) - 1) / 3) for i in range(4)}) if len(layers) > 1 else [0]
    fig, axes = plt.subplots(1, len(picks) + 1, figsize=(3.3 * (len(picks) + 1), 3.2), squeeze=False)
    marks = {"shared": "S", "unused": "·"}
    for ax, index in zip(axes[0], picks):
        ax.imshow(shares[:, index, :], aspect="auto", cmap="viridis")
        ax.set_title(f"layer {layers[index]}: share of slots", fontsize=9)
        ax.set_yticks(range(len(experts["langs"])), experts["langs"], fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        labels = [marks.get(c, c.split(":", 1)[-1][:2]) for c in experts["classes"][index]]
        ax.set_xticks(range(len(labels)), labels, fontsize=6)
    ax = axes[0][-1]
    ax.plot(layers, experts["specialisation"], marker="o")
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer", fontsize=8)
    ax.set_title("IG(L;E) / H(L)", fontsize=9)
    fig.suptitle("expert x language dispatch (S = shared, · = unused, code = exclusive to that language)",
                 fontsize=9)
    return _save(fig, folder / f"{prefix}expert_language_map.png")


def _hidden(folder: Path, result: dict, prefix: str) -> str:
    plt = _plt()
    hidden = result["hidden_alignment"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for lang in result["langs"]:
        line = None
        if lang in hidden["mexa"]:
            line, = axes[0].plot(hidden["layers"], hidden["mexa"][lang], marker="o", label=f"{lang} MEXA")
        if lang in hidden["cosine"]:
            axes[0].plot(hidden["layers"], hidden["cosine"][lang], linestyle=":", label=f"{lang} cosine",
                         color=line.get_color() if line else None)
        similarity = [1 - v / math.log(2) for v in result["metrics"]["js_pair_mean"][lang]]
        axes[1].plot(result["moe_layers"], similarity, marker="s", label=lang)
    axes[0].set_xlabel("decoder layer")
    axes[0].set_title("hidden-state alignment to the anchor", fontsize=9)
    axes[0].set_ylim(min(0, axes[0].get_ylim()[0]), 1.02)
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("decoder layer (MoE)")
    axes[1].set_title("routing similarity 1 - js_pair_mean / ln 2", fontsize=9)
    axes[1].legend(fontsize=7)
    return _save(fig, folder / f"{prefix}hidden_alignment.png")
