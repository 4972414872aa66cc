"""Comparisons, sentences and plots of an experiment's `summary.json` (`experiment.run_experiment`).

    from sara_moe.experiment.report import comparisons, summary_sentences, write_report
    summary["comparisons"] = comparisons(summary, item_scores)   # paired tests over items and world seeds
    write_report(summary, "runs/demo")                             # summary.json, report.md, accuracy_<world>.png
    fig = draw_world(summary, "routed_topic")                      # that plot: arms as categories, dots + 95% CIs

Every sentence of the report is generated here from the numbers in the summary: the wording
(better / worse / no significant difference) follows the sign and the p-value, so the same code
writes a gain, a tie or a loss. Differences are accuracy points on **test** items, arm minus
baseline, averaged over valid world seeds and fine-tuning seeds; the p-value is a paired
bootstrap over (world seed, item) pairs of the FT-seed-mean per-item difference; per world seed
the same test gives its own p. Invalid worlds (experiment.VALIDITY) are listed, never pooled.
"""

from __future__ import annotations

import json
from pathlib import Path

from sara_moe.evaluation.paired_tests import mean_std, paired_bootstrap
from sara_moe.experiment.design import CLONE
from sara_moe.experiment.neuron_view import markdown as neuron_markdown

ALPHA = 0.05
# (arm, baseline) pairs compared wherever both arms ran
PAIRS = [("sara", "sft"), ("sara", "sara_shuffled"), ("sara", "sara_mean"), ("sara", "sara_topic_shuffled"),
         ("sara_shuffled", "sft"), ("sara_mean", "sft"), ("sara_topic_shuffled", "sft"), ("sft", "base"),
         ("kl", "sft"), ("sara", "kl"), ("steer", "sft"), ("sara", "steer")]
ARM_NAMES = {"base": "the base model", "sft": "SFT", "sara": "SARA", "sara_shuffled": "SARA with shuffled priors",
             "sara_mean": "SARA with the mean prior", "sara_topic_shuffled": "SARA with a same-topic prior",
             "kl": "KL alignment", "steer": "router steering"}


def _item_means(entries: list[dict], lang: str, split: str, part: str = "test") -> dict:
    """Per item of (lang, split, part): mean score over the FT seeds of these runs."""
    sums: dict[str, list[float]] = {}
    for entry in entries:
        for key, score in entry["scores"].items():
            if tuple(entry["meta"][key]) == (lang, split, part):
                sums.setdefault(key, []).append(score)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def comparisons(summary: dict, item_scores: list[dict], part: str = "test") -> list[dict]:
    """Arm minus baseline per (world kind, split, language) over the valid world seeds, on `part`
    items: `test` for the report, `dev` for recipe selection (`summary["dev_comparisons"]`)."""
    valid = {(w["world"], w["world_seed"]) for w in summary["worlds"] if w["valid"]}
    out = []
    for world in dict.fromkeys(w["world"] for w in summary["worlds"]):
        seeds = [w["world_seed"] for w in summary["worlds"] if w["world"] == world and (world, w["world_seed"]) in valid]
        entries = [e for e in item_scores if e["world"] == world]
        arms = {e["arm"] for e in entries}
        langs = sorted({m[0] for e in entries for m in e["meta"].values()})
        for arm, baseline in PAIRS:
            if arm not in arms or baseline not in arms or not seeds:
                continue
            for split in ("shared", "en_only"):
                for lang in langs:
                    per_seed, pooled_a, pooled_b = [], [], []
                    for seed in seeds:
                        a = _item_means([e for e in entries if e["world_seed"] == seed and e["arm"] == baseline], lang, split, part)
                        b = _item_means([e for e in entries if e["world_seed"] == seed and e["arm"] == arm], lang, split, part)
                        keys = sorted(set(a) & set(b))
                        if not keys:
                            continue
                        test = paired_bootstrap([a[k] for k in keys], [b[k] for k in keys])
                        per_seed.append({"world_seed": seed, "diff": test["diff"], "p_value": test["p"], "n_items": len(keys)})
                        pooled_a += [a[k] for k in keys]
                        pooled_b += [b[k] for k in keys]
                    if not per_seed:
                        continue
                    pooled = paired_bootstrap(pooled_a, pooled_b)
                    diffs = [s["diff"] for s in per_seed]
                    out.append({
                        "world": world, "split": split, "lang": lang, "arm": arm, "baseline": baseline,
                        "diff_mean": sum(diffs) / len(diffs), "p_value": pooled["p"],
                        "ci_low": pooled["ci_low"], "ci_high": pooled["ci_high"],
                        "n_world_seeds": len(per_seed), "n_positive": sum(d > 0 for d in diffs),
                        "n_significant_positive": sum(s["diff"] > 0 and s["p_value"] < ALPHA for s in per_seed),
                        "n_significant_negative": sum(s["diff"] < 0 and s["p_value"] < ALPHA for s in per_seed),
                        "diff_min": min(diffs), "diff_max": max(diffs), "per_world_seed": per_seed})
    return out


# ----------------------------------------------------------------------------- sentences


def pts(x: float) -> str:
    """Accuracy difference in points with a sign and one decimal (0..1 in, `+4.2` out)."""
    value = round(100 * x, 1)
    return f"{value:+.1f}" if value != 0 else "0.0"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def comparison_sentence(c: dict) -> str:
    """One sentence for one comparison; its verdict follows diff and p."""
    arm, base = ARM_NAMES.get(c["arm"], c["arm"]), ARM_NAMES.get(c["baseline"], c["baseline"])
    where = f"{'facts seen only in English' if c['split'] == 'en_only' else 'facts the clone saw'} ({c['lang']})"
    if c["p_value"] < ALPHA and c["diff_mean"] > 0:
        verdict = f"{arm} is better than {base}"
    elif c["p_value"] < ALPHA and c["diff_mean"] < 0:
        verdict = f"{arm} is worse than {base}"
    else:
        verdict = f"no significant difference between {arm} and {base}"
    spread = (f"; positive in {c['n_positive']} of {c['n_world_seeds']} world seeds, significantly positive in "
              f"{c['n_significant_positive']}, significantly negative in {c['n_significant_negative']}; "
              f"range {pts(c['diff_min'])} to {pts(c['diff_max'])}") if c["n_world_seeds"] > 1 else ""
    return f"On {where}: {verdict} ({pts(c['diff_mean'])} points, {_p(c['p_value'])}{spread})."


def _find(summary: dict, world: str, arm: str, baseline: str, split: str, lang: str) -> dict | None:
    return next((c for c in summary["comparisons"] if (c["world"], c["arm"], c["baseline"], c["split"], c["lang"])
                 == (world, arm, baseline, split, lang)), None)


def validity_text(rule: dict) -> str:
    """The validity rule in words (the keys experiment.validity reads)."""
    parts = []
    if "en_knowledge_min" in rule:
        parts.append(f"English facts of both splits known as pretraining sentences ≥ {100 * rule['en_knowledge_min']:.0f}%")
    if "en_shared_min" in rule:
        parts.append(f"English shared facts ≥ {100 * rule['en_shared_min']:.0f}%")
    parts.append(f"clone English-only facts ≤ {100 * rule['clone_en_only_max']:.0f}%")
    return ", ".join(parts)


def summary_sentences(summary: dict, world: str) -> list[str]:
    """The plain statements for one world kind, each built from the summary's numbers."""
    lines = []
    worlds = [w for w in summary["worlds"] if w["world"] == world]
    valid = [w for w in worlds if w["valid"]]
    rule = summary["config"]["validity"]
    lines.append(f"{len(valid)} of {len(worlds)} world seeds are valid (base model on dev: {validity_text(rule)})."
                 + "".join(
                     f" World seed {w['world_seed']} is left out: {'; '.join(w['reasons'])}." for w in worlds
                     if not w["valid"]))
    if not valid:
        return lines + ["No valid world: this world kind cannot answer the question with these settings."]
    damage = _find(summary, world, "sft", "base", "shared", "en")
    if damage:
        lines.append("Fine-tuning regime: " + comparison_sentence(damage))
    for arm, baseline in [("sara", "sft"), ("sara", "sara_shuffled"), ("sara", "sara_mean"),
                          ("sara", "sara_topic_shuffled"), ("kl", "sft"), ("steer", "sft")]:
        c = _find(summary, world, arm, baseline, "en_only", CLONE)
        if c:
            lines.append(comparison_sentence(c))
    costs = [c for c in summary["comparisons"] if c["world"] == world and c["arm"] == "sara"
             and c["baseline"] == "sft" and c["split"] == "shared"]
    for c in costs:
        lines.append("Cost check: " + comparison_sentence(c))
    valid_seeds = {w["world_seed"] for w in valid}
    rows_of = {arm: [r for r in summary["routing"] if r["world"] == world and r["arm"] == arm
                     and r["world_seed"] in valid_seeds] for arm in ("base", "sft", "sara")}
    layers = summary["selected"]["recipe"]["align_layers"]
    if rows_of["base"]:
        def band(arm):
            vals = [r["clone_js"][r["layers"].index(layer)] for r in rows_of[arm] for layer in layers
                    if layer in r["layers"]]
            return sum(vals) / len(vals) if vals else None
        parts = [f"{ARM_NAMES[arm]} {band(arm):.3f}" for arm in ("sft", "sara") if band(arm) is not None]
        lines.append(f"Clone-vs-English routing JS at the aligned layers {layers} (mean over valid world seeds): base "
                     f"{band('base'):.3f}" + (" → " + ", ".join(parts) if parts else "") + ".")
    return lines


# ----------------------------------------------------------------------------- tables, plots, files


def _accuracy_table(summary: dict, world: str) -> list[str]:
    rows = [r for r in summary["runs"] if r["world"] == world]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    seeds = list(dict.fromkeys(r["world_seed"] for r in rows))
    cols = [(split, lang) for split in ("en_only", "shared") for lang in sorted({r["lang"] for r in rows}, reverse=True)]
    lines = ["| world seed | arm | " + " | ".join(f"{lang} {split}" for split, lang in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for seed in seeds:
        for arm in arms:
            cells = []
            for split, lang in cols:
                accs = [100 * r["acc"] for r in rows if (r["world_seed"], r["arm"], r["split"], r["lang"]) == (seed, arm, split, lang)]
                mean, std = mean_std(accs) if accs else (float("nan"), 0.0)
                cells.append(f"{mean:.1f}" + (f" ± {std:.1f}" if len(accs) > 1 else ""))
            lines.append(f"| {seed} | {arm} | " + " | ".join(cells) + " |")
    return lines


def arm_accuracy(summary: dict, world: str, split: str) -> list[dict]:
    """Per arm (in run order): clone accuracy on `split` test items over the valid world seeds' runs
    (every FT seed of every valid world seed): mean and 95% bootstrap CI (`paired_bootstrap` against
    zero, seed 0), plus each world seed's mean over its FT seeds (invalid seeds flagged)."""
    rows = [r for r in summary["runs"] if r["world"] == world and r["lang"] == CLONE and r["split"] == split]
    invalid = {w["world_seed"] for w in summary["worlds"] if w["world"] == world and not w["valid"]}
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        valid = [100 * r["acc"] for r in mine if r["world_seed"] not in invalid]
        seeds = {}
        for r in mine:
            seeds.setdefault(r["world_seed"], []).append(100 * r["acc"])
        entry = {"arm": arm, "n_runs": len(valid), "per_world_seed": [
            {"world_seed": seed, "mean": sum(v) / len(v), "valid": seed not in invalid} for seed, v in seeds.items()]}
        if valid:
            test = paired_bootstrap([0.0] * len(valid), valid)
            entry.update(mean=test["diff"], ci_low=test["ci_low"], ci_high=test["ci_high"])
        out.append(entry)
    return out


def draw_world(summary: dict, world: str):
    """The accuracy figure of one world kind: arms are categories on x; per arm a dot at the mean over
    the valid world seeds x FT seeds with its 95% CI, and one small mark per world seed (hollow:
    invalid). No line joins arms. Returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, split in zip(axes, ("en_only", "shared")):
        arms = arm_accuracy(summary, world, split)
        for x, entry in enumerate(arms):
            seeds = entry["per_world_seed"]
            offsets = [0.12 * (i - (len(seeds) - 1) / 2) / max(1, len(seeds) - 1) for i in range(len(seeds))]
            for offset, seed in zip(offsets, seeds):
                ax.scatter([x + 0.25 + offset], [seed["mean"]], s=14, color="grey" if seed["valid"] else "none",
                           edgecolors="grey", linewidths=0.8, zorder=2,
                           label="world seed (mean over FT seeds; hollow: invalid)" if x == 0 and offset == offsets[0]
                           else None)
            if "mean" in entry:
                ax.errorbar([x], [entry["mean"]], yerr=[[entry["mean"] - entry["ci_low"]],
                                                        [entry["ci_high"] - entry["mean"]]],
                            fmt="o", linestyle="none", color="tab:blue", capsize=4, zorder=3,
                            label="mean, 95% CI over valid world seeds x FT seeds" if x == 0 else None)
        ax.set_xticks(range(len(arms)), [e["arm"] for e in arms], rotation=30, ha="right")
        ax.set_xlim(-0.5, len(arms) - 0.5 + 0.3)
        ax.set_title(f"{world}: clone, {split} facts (test)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("accuracy %")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_world(summary: dict, world: str, path: Path) -> None:
    """`draw_world` saved to `path`."""
    import matplotlib.pyplot as plt

    fig = draw_world(summary, world)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(summary: dict, plots: dict) -> str:
    recipe = summary["selected"]["recipe"]
    worlds = list(dict.fromkeys(w["world"] for w in summary["worlds"]))
    lines = ["# SARA on the cloned-language testbed", "",
             f"Recipe (chosen on dev: {summary['selected'].get('source', 'not recorded')}): lr {recipe['learning_rate']}, "
             f"{recipe['max_steps']} steps of batch {recipe['batch_size']}, λ_JS {recipe['lambda_js']} on layers "
             f"{recipe['align_layers']}. All accuracies below are on **test** items; differences are accuracy points "
             f"(arm − baseline). Full study and what it implies: `docs/testbed.md`.", ""]
    for world in worlds:
        lines += [f"## World kind `{world}`", ""] + [f"- {s}" for s in summary_sentences(summary, world)] + [""]
        lines += ["Accuracy (%, mean ± std over fine-tuning seeds):", ""] + _accuracy_table(summary, world) + [""]
        if world in plots:
            lines += [f"![accuracy per arm, {world}]({plots[world]})", ""]
        comps = [c for c in summary["comparisons"] if c["world"] == world]
        if comps:
            lines += ["All comparisons (test):", "", "| arm | baseline | split | lang | diff (pts) | p | seeds + / n |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {c['arm']} | {c['baseline']} | {c['split']} | {c['lang']} | {pts(c['diff_mean'])} | "
                      f"{c['p_value']:.3f} | {c['n_positive']} / {c['n_world_seeds']} |" for c in comps]
            lines.append("")
    if summary.get("neurons"):  # an analysis beside the arms (ExperimentConfig.neurons)
        lines += neuron_markdown(summary["neurons"])
    cache = summary.get("runs_read_back", {})
    lines.append(f"Wall time: {summary.get('seconds', 0):.0f} s." + (
        f" {cache['cached']} of {cache['total']} runs were read back from the run cache, so this is not the time "
        "to train them (each run's own time is in its result.json)." if cache.get("cached") else ""))
    return "\n".join(lines) + "\n"


def write_report(summary: dict, output_dir) -> Path:
    """Write summary.json, accuracy_<world>.png and report.md into `output_dir` (each atomically)."""
    from sara_moe.runtime import artifacts

    plots = {world: f"accuracy_{world}.png" for world in dict.fromkeys(w["world"] for w in summary["worlds"])
             if any(r["world"] == world for r in summary["runs"])}
    # a rerun of a cached experiment regenerates its report from the same runs, hence overwrite
    with artifacts.publishing(output_dir, overwrite=True, primary="summary.json") as staging:
        for world, name in plots.items():
            plot_world(summary, world, staging / name)
        (staging / "report.md").write_text(render_markdown(summary, plots), encoding="utf-8")
        (staging / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return Path(output_dir) / "report.md"


def render_search(result: dict) -> str:
    """`search_report.md` from a `search.json` (experiment_select.search): a row per candidate and the
    verdict, both from the numbers (dev items only; the bar and the cost limit come from the record)."""
    limit = result.get("damage_points", 0.02)
    lines = ["# Where does SARA win world by world? (dev items only)", "",
             f"Rule: {result['rule']}.", "",
             "| candidate | valid worlds | seeds beating both | SARA − SFT | SARA − shuffled | worst shared cost |",
             "|---|---|---|---|---|---|"]
    n_seeds = len(result.get("world_seeds", [])) or None
    for row in result["table"]:
        if not row["n_valid"]:
            lines.append(f"| {row['candidate']} | 0 of {n_seeds} | — | — | — | — |")
            continue
        cost = f"{round(100 * row['cost'], 1) + 0.0:.1f}" + (" (excluded)" if row["cost"] > limit else "")  # no "-0.0"
        lines.append(f"| {row['candidate']} | {row['n_valid']} of {n_seeds} | {row['wins']} | "
                     f"{pts(row['gain_vs_sft'])} | {pts(row['gain_vs_shuffled'])} | {cost} |")
    rows = {r["candidate"]: r for r in result["table"]}
    best = rows.get(result["choice"])
    lines.append("")
    if best is None:
        lines.append("No candidate had a valid world, so nothing was chosen.")
    else:
        seeds = ", ".join(str(s) for s in best["win_seeds"]) or "none"
        verdict = "meets" if result["bar_met"] else "does not meet"
        lines.append(f"The dev choice, {best['candidate']}, {verdict} the bar of {result['bar']} world seeds: it beats "
                     f"both baselines in {best['wins']} of {best['n_valid']} valid world seeds (seeds: {seeds}); "
                     f"SARA − SFT {pts(best['gain_vs_sft'])}, SARA − shuffled {pts(best['gain_vs_shuffled'])} points.")
        enough = sum(r["n_valid"] >= result["bar"] for r in result["table"])
        lines.append(f"{enough} of {len(result['table'])} candidates had at least {result['bar']} valid world seeds, "
                     f"which the bar needs; the most seeds any candidate won is "
                     f"{max(r['wins'] for r in result['table'])}.")
    return "\n".join(lines) + "\n"
