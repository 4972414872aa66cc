"""Routing in `sara report`: does middle-layer routing similarity predict accuracy? And the maps.

    from sara_moe.reporting.routing_panels import routing_accuracy, pearson_with_ci, routing_curves
    fits = routing_accuracy(runs)          # one fit per eval set, over (run, language) points
    curves = routing_curves(runs, arms, before_analysis)   # routing_js.png: per arm, before / after
    pearson_with_ci([0.1, 0.2, 0.3], [0.7, 0.6, 0.4])   # {"r", "ci_low", "ci_high", ...}

Bandarkar et al.'s central finding is that a language's accuracy rises with how similar its
middle-layer routing is to English's. Here, per eval set, every run that has an
`analysis.json` (see `report.load_runs`) gives one point per language it was evaluated and
analysed on: x = the language's `js_pair_mean` averaged over the analysis' `recommended_layers`
(lower = routing closer to the anchor), y = the run's score on that language. Several languages
of one checkpoint, or one language over several checkpoints, both work. The fit reports
Pearson's r, a 95% percentile bootstrap CI of r (10,000 resamples of the points, seed 0;
resamples with no spread in x or y are skipped and counted), the least-squares line and n.
Fewer than 3 points give no fit (the reason is recorded). `routing_vs_accuracy.png` plots it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

RESAMPLES = 10_000


def middle_divergence(analysis: dict, lang: str) -> float | None:
    """Mean js_pair_mean of `lang` over the analysis' recommended layers (None if not analysed)."""
    values = analysis["metrics"]["js_pair_mean"].get(lang)
    if values is None:
        return None
    layers = analysis["moe_layers"]
    band = [layers.index(x) for x in analysis.get("recommended_layers") or layers if x in layers] or range(len(layers))
    return float(np.mean([values[i] for i in band]))


def pearson_with_ci(x, y, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Pearson r of the points, its percentile bootstrap 95% CI, and the least-squares line."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    if n < 3:
        return {"n": n, "r": None, "reason": f"{n} point(s); a correlation needs at least 3"}
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": n, "r": None, "reason": "no spread in routing divergence or in accuracy"}
    r = float(np.corrcoef(x, y)[0, 1])
    slope, intercept = (float(v) for v in np.polyfit(x, y, 1))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    xs, ys = x[picks], y[picks]
    xc, yc = xs - xs.mean(1, keepdims=True), ys - ys.mean(1, keepdims=True)
    denom = np.sqrt((xc ** 2).sum(1) * (yc ** 2).sum(1))
    ok = denom > 0
    rs = np.clip((xc * yc).sum(1)[ok] / denom[ok], -1.0, 1.0)  # rounding can step past +-1
    low, high = (float(v) for v in np.percentile(rs, [2.5, 97.5])) if len(rs) else (math.nan, math.nan)
    return {"n": n, "r": r, "ci_low": low, "ci_high": high, "slope": slope, "intercept": intercept,
            "resamples": resamples, "skipped_resamples": int((~ok).sum())}


def routing_accuracy(runs) -> list[dict]:
    """Per eval set: the (run, language) points and their fit; see the module docstring."""
    fits = []
    for benchmark in dict.fromkeys(run.benchmark for run in runs):
        points = []
        for run in runs:
            if run.benchmark != benchmark or not run.analysis:
                continue
            metric = run.results["metrics"][0]
            for lang, entry in run.results["per_language"].items():
                x = middle_divergence(run.analysis, lang)
                if x is not None and metric in entry:
                    points.append({"arm": run.arm, "run": run.source, "lang": lang, "divergence": x,
                                   "score": float(entry[metric])})
        if not points:
            continue
        fit = pearson_with_ci([p["divergence"] for p in points], [p["score"] for p in points])
        fits.append({"benchmark": benchmark, "metric": run_metric(runs, benchmark), "points": points, **fit})
    return fits


def run_metric(runs, benchmark: str) -> str:
    return next(run.results["metrics"][0] for run in runs if run.benchmark == benchmark)


def plot_routing_accuracy(folder: Path, fits: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for fit in fits:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for point in fit["points"]:
            ax.scatter(point["divergence"], 100 * point["score"], color="tab:blue")
            ax.annotate(f"{point['lang']} ({point['arm']})", (point["divergence"], 100 * point["score"]), fontsize=7)
        if fit.get("r") is not None:
            xs = np.linspace(min(p["divergence"] for p in fit["points"]), max(p["divergence"] for p in fit["points"]))
            ax.plot(xs, 100 * (fit["slope"] * xs + fit["intercept"]), color="tab:red",
                    label=f"r = {fit['r']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}], n = {fit['n']}")
            ax.legend(fontsize=8)
        ax.set_xlabel("middle-band js_pair_mean to the anchor (nats)")
        ax.set_ylabel(f"{fit['metric']} (%)")
        ax.set_title(f"{fit['benchmark']}: routing similarity vs accuracy", fontsize=9)
        name = "routing_vs_accuracy_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", fit["benchmark"]) + ".png"
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def routing_curves(runs: list, arms: list[str], before_global: dict | None) -> dict:
    """{arm: {"layers", "after", "before"?}}: js_pair_mean averaged over languages and runs."""
    def mean_curve(analyses):
        curves = [np.mean([v for v in a["metrics"]["js_pair_mean"].values()], axis=0) for a in analyses]
        return np.mean(curves, axis=0).tolist()

    curves = {}
    for arm in arms:
        mine = {id(r.analysis): r for r in runs if r.arm == arm and r.analysis}
        if not mine:
            continue
        analyses = [r.analysis for r in mine.values()]
        entry = {"layers": analyses[0]["moe_layers"], "after": mean_curve(analyses)}
        befores = [r.analysis_before for r in mine.values() if r.analysis_before]
        if befores or before_global:
            entry["before"] = mean_curve(befores or [before_global])
            entry["before_is_shared"] = not befores  # --before-analysis: the same base model for every arm
        curves[arm] = entry
    return curves


def plot_routing_curves(folder: Path, curves: dict) -> list[str]:
    """routing_js.png: each arm's mean js_pair_mean per MoE layer, after (solid) and before (dashed)."""
    if not curves:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    shared_drawn = False
    for k, (arm, entry) in enumerate(curves.items()):
        color = f"C{k}"
        ax.plot(entry["layers"], entry["after"], marker="o", color=color, label=f"{arm} (after)")
        if "before" in entry and not (entry["before_is_shared"] and shared_drawn):
            shared = entry["before_is_shared"]
            ax.plot(entry["layers"], entry["before"], linestyle="--", color="black" if shared else color,
                    label="before (base model)" if shared else f"{arm} (before)")
            shared_drawn = shared_drawn or shared
        ax.set_xticks(entry["layers"])
    ax.set_xlabel("decoder layer (MoE layers)")
    ax.set_ylabel("routing JS to anchor (nats)")
    ax.set_title("routing divergence per layer, mean over languages")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "routing_js.png", dpi=120)
    plt.close(fig)
    names.append("routing_js.png")
    return names


def plot_arm_maps(folder: Path, runs) -> dict:
    """Each arm's (first) analysis maps, as `analysis_plots` draws them, prefixed by the arm name."""
    from sara_moe.analysis.plots import plot_maps

    maps, needed = {}, {"langs", "anchor", "recommended_layers", "num_experts"}
    for run in runs:
        if run.analysis and run.arm not in maps and needed <= set(run.analysis):  # older analyses: no maps
            prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", run.arm) + "_"
            maps[run.arm] = plot_maps(folder, run.analysis, prefix)
    return maps


def routing_markdown(report: dict) -> list[str]:
    lines = []
    for fit in report.get("routing_accuracy", []):
        lines += [f"## Routing similarity vs accuracy — {fit['benchmark']}", ""]
        if fit.get("r") is None:
            lines += [f"No fit: {fit['reason']}.", ""]
            continue
        lines += [f"Pearson r between middle-band `js_pair_mean` and {fit['metric']} over {fit['n']} "
                  f"(run, language) points: **r = {fit['r']:.3f}**, 95% bootstrap CI [{fit['ci_low']:.3f}, "
                  f"{fit['ci_high']:.3f}] ({fit['resamples']} resamples); a negative r means languages whose "
                  "routing is closer to the anchor score higher (Bandarkar et al.'s finding).", ""]
    for arm, names in report.get("routing_maps", {}).items():
        lines += [f"## Routing maps — {arm}", ""] + [f"![{name}]({name})" for name in names] + [""]
    return lines
