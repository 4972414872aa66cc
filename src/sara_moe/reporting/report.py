"""Compare evaluation runs: per-language accuracy per arm, paired tests, routing plots.

    sara report runs/sft-seed0/eval runs/sft-seed1/eval runs/sara-seed0/eval runs/sara-seed1/eval \\
        --output_dir runs/report [--labels sft,sft,sara,sara] [--baseline sft] [--before_analysis runs/base/analysis]
    sara report --config report.yaml          # YAML with run_dirs: [...], output_dir: ...; flags override it

    from sara_moe.reporting.report import build_report, paired_bootstrap, mcnemar_exact
    report = build_report(["runs/a/eval", "runs/b/eval"], "runs/report")

**Runs.** Each RUN_DIR is a `sara eval` output dir (or one `results_*.json`). Its results files
are split into variants by eval set (task + data file) and steering strength; of repeated
files of one variant the newest counts. **Arms** (the grouping rule): `--labels` (one per
RUN_DIR; equal labels form one arm), else the `arm` recorded by `sara eval --arm`, else the
run dir's name (the `eval` folder's parent when the dir is called `eval`) with a trailing
seed marker (`-seed1`, `_s2`, `.seed3`) removed; steering variants get ` steer=S` appended.
**Numbers.** Per eval set, language and arm: mean ± sample std (ddof 1) over the arm's runs of
the run's score (its mean over eval seeds). **Test.** Each arm is compared with the reference
arm (`--baseline`, default the first arm) per language by a *paired bootstrap over items*:
items are matched by (lang, id) — only ids present in every run of both arms are paired; the
others are counted (`n_dropped`) and the outcome line says how many were dropped; arms
sharing no id are refused — each item's score is its mean over the arm's runs and seeds,
the item differences are resampled 10,000 times (seed 0); the p-value is two-sided
(`2·min(P*(Δ<0), P*(Δ>0))`, resampled means of exactly 0 counting half to each side, capped at 1), the CI is the 2.5–97.5 percentile, α = 0.05.
When both arms have one binary score per item an exact McNemar p is reported beside it.
**Routing.** `analysis.json` files (from `sara analyze`) at `RUN_DIR/analysis.json`,
`RUN_DIR/analysis/analysis.json` or the parent run's — the model after training — and, for
before, `RUN_DIR/analysis_before/analysis.json` or `--before-analysis`: `routing_js.png` plots
mean-over-languages `js_pair_mean` per MoE layer, before (dashed) and after (solid), per arm;
each arm's analysis maps are redrawn (`<arm>_*.png`, see `analysis_plots`), and routing
similarity is fitted against accuracy across (run, language) points (`report_routing`:
Pearson r with a bootstrap CI, `routing_vs_accuracy_<set>.png`).
**Neurons.** `--neurons` (`neurons_compare.json` files or folders from `sara neurons --compare`) adds
the language-neuron section, `neurons_specific.png` and report.json's `neurons` (`neuron_panels`).
Outputs: report.md (the outcome on its first screen), report.json (with run metadata),
accuracy_<set>.png, routing_js.png, the routing maps and fits, monitor_*.png (`monitor_curves`),
report.html (interactive, self-contained: `html_report`), report_config.json (the resolved
`ReportConfig`) — published through `artifacts`; an existing report.json is refused unless `--overwrite`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from sara_moe.evaluation.items import EvalItemsError
from sara_moe.evaluation.paired_tests import mcnemar_exact, mean_std, paired_bootstrap
from sara_moe.reporting.html_report import write_html
from sara_moe.reporting.monitor_curves import monitor_curves, monitor_markdown, plot_monitor_curves
from sara_moe.reporting.neuron_panels import neuron_markdown, plot_neurons, read_comparisons
from sara_moe.reporting.routing_panels import (
    plot_arm_maps,
    plot_routing_accuracy,
    plot_routing_curves,
    routing_accuracy,
    routing_curves,
    routing_markdown,
)
from sara_moe.runtime import artifacts
from sara_moe.runtime.options import parse_config

ALPHA = 0.05
TEST_NAME = ("paired bootstrap over items (10,000 resamples of the per-item score differences, two-sided, "
             "alpha = 0.05)")


class ReportError(EvalItemsError):
    """Bad report input; the message names the file and field."""


@dataclass
class Run:
    source: str
    arm: str
    benchmark: str
    results: dict
    items: dict = field(default_factory=dict)  # (lang, id) -> mean score over eval seeds
    analysis: dict | None = None
    analysis_before: dict | None = None


# ----------------------------------------------------------------------------- loading

_SEED_SUFFIX = re.compile(r"[-_.]?(seed|s)[-_]?\d+$", re.IGNORECASE)


def default_arm_name(run_dir: Path) -> str:
    folder = run_dir.parent if run_dir.name == "eval" and run_dir.parent.name else run_dir
    return _SEED_SUFFIX.sub("", folder.resolve().name) or folder.resolve().name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def _read_analysis(candidates: list[Path]) -> dict | None:
    for path in candidates:
        if path.is_file():
            data = _read_json(path)
            if "moe_layers" not in data or "js_pair_mean" not in data.get("metrics", {}):
                raise ReportError(f"{path}: field 'moe_layers' or 'metrics.js_pair_mean' is missing")
            return data
    return None


def _item_scores(results_path: Path, results: dict) -> dict:
    """(lang, id) -> the item's primary-metric score, averaged over eval seeds; {} without samples."""
    name = results.get("samples_file")
    path = results_path.parent / name if name else None
    if path is None or not path.is_file():
        return {}
    sums: dict = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            metric = next((m for m in results["metrics"] if m in row), None)
            if metric is None:
                return {}  # no per-item scores (e.g. an older lm-eval run)
            for key in ("lang", "id"):
                if key not in row:
                    raise ReportError(f"{path}:{line_no}: field {key!r} is missing")
            total, count = sums.get((row["lang"], str(row["id"])), (0.0, 0))
            sums[(row["lang"], str(row["id"]))] = (total + float(row[metric]), count + 1)
    return {key: total / count for key, (total, count) in sums.items()}


@dataclass
class ReportConfig:
    """Options of `sara report`; the run dirs may also be given as leading words (`sara report A B ...`)."""

    output_dir: str = field(metadata={"help": "folder for report.md, report.json, the plots, report_config.json"})
    run_dirs: list[str] = field(default_factory=list, metadata={
        "help": "sara eval output dirs (or results_*.json files); usually given as leading words"})
    labels: list[str] | None = field(default=None, metadata={"help": "arm name per run dir (equal names = one arm)"})
    baseline: str | None = field(default=None, metadata={"help": "reference arm of the tests; none = the first arm"})
    before_analysis: str | None = field(default=None, metadata={
        "help": "analysis.json (or its dir) of the model before training"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing report in output_dir"})
    neurons: list[str] | None = field(default=None, metadata={
        "help": "neurons_compare.json files or folders from `sara neurons --compare`"})


def load_runs(run_dir, label: str | None = None) -> list[Run]:
    """One Run per (eval set, steering strength) variant in `run_dir` (newest file of each)."""
    path = Path(run_dir)
    if path.is_file():
        files, folder = [path], path.parent
    elif path.is_dir():
        files, folder = sorted(path.glob("results*.json")), path
    else:
        raise ReportError(f"{path}: no such run dir or results file")
    if not files:
        raise ReportError(f"{path}: no results_*.json (run `sara eval ... --output-dir {path}` first)")
    newest: dict = {}
    for file in files:  # timestamped names sort by time
        results = _read_json(file)
        for key in ("per_language", "metrics"):
            if not results.get(key):
                raise ReportError(f"{file}: field {key!r} is missing or empty")
        steer = results.get("steer") or {}
        benchmark = f"{results.get('task', '?')}:{Path(results.get('data') or 'lm-eval').stem}"
        newest[(benchmark, steer.get("strength"))] = (file, results)
    runs = []
    after = [folder / "analysis.json", folder / "analysis" / "analysis.json", folder.parent / "analysis.json",
             folder.parent / "analysis" / "analysis.json"]
    before = [folder / "analysis_before" / "analysis.json", folder.parent / "analysis_before" / "analysis.json"]
    for (benchmark, strength), (file, results) in newest.items():
        arm = label or results.get("arm") or default_arm_name(folder)
        if strength is not None:
            arm = f"{arm} steer={strength:g}"
        for lang, entry in results["per_language"].items():
            if not entry.get("n"):
                raise ReportError(f"{file}: per_language[{lang!r}] has zero items (field 'n')")
        runs.append(Run(str(file), arm, benchmark, results, _item_scores(file, results),
                        _read_analysis(after), _read_analysis(before)))
    return runs


# ----------------------------------------------------------------------------- report


def _arm_order(runs: list[Run], baseline: str | None) -> list[str]:
    arms = list(dict.fromkeys(run.arm for run in runs))
    if baseline is not None:
        if baseline not in arms:
            raise ReportError(f"--baseline {baseline!r}: no such arm (arms: {', '.join(arms)})")
        arms.remove(baseline)
        arms.insert(0, baseline)
    return arms


def compare(runs: list[Run], baseline: str | None = None) -> dict:
    """The report's numbers (report.json): per eval set, language and arm; paired tests vs the reference."""
    arms = _arm_order(runs, baseline)
    benchmarks = []
    for benchmark in dict.fromkeys(run.benchmark for run in runs):
        mine = [run for run in runs if run.benchmark == benchmark]
        langs = sorted({lang for run in mine for lang in run.results["per_language"]})
        metric_of = {lang: _lang_metric(mine, lang) for lang in langs}
        metric = mine[0].results["metrics"][0]
        bench_arms = [arm for arm in arms if any(run.arm == arm for run in mine)]
        table: dict = {}
        for lang in langs:
            table[lang] = {}
            for arm in bench_arms:
                values = [run.results["per_language"][lang][metric_of[lang]] for run in mine
                          if run.arm == arm and metric_of[lang] in run.results["per_language"].get(lang, {})]
                if values:
                    mean, std = mean_std(values)
                    n_items = max(run.results["per_language"][lang]["n"] for run in mine
                                  if run.arm == arm and lang in run.results["per_language"])
                    table[lang][arm] = {"mean": mean, "std": std, "n_runs": len(values), "n_items": n_items,
                                        "values": values}
        comparisons = [_compare_arms(mine, bench_arms[0], arm, lang, metric_of[lang])
                       for arm in bench_arms[1:] for lang in langs]
        benchmarks.append({"name": benchmark, "metric": metric, "metric_by_language": metric_of,
                           "reference": bench_arms[0], "arms": bench_arms,
                           "per_language": table, "comparisons": [c for c in comparisons if c]})
    return {"test": TEST_NAME, "alpha": ALPHA, "arms": {arm: [r.source for r in runs if r.arm == arm] for arm in arms},
            "benchmarks": benchmarks}


def _lang_metric(runs: list[Run], lang: str) -> str:
    """The first of the results' metrics that this language has (lm-eval runs may mix tasks)."""
    for metric in runs[0].results["metrics"]:
        if any(metric in run.results["per_language"].get(lang, {}) for run in runs):
            return metric
    raise ReportError(f"{runs[0].source}: per_language[{lang!r}] has none of the metrics {runs[0].results['metrics']}")


def _arm_item_scores(runs: list[Run], arm: str, lang: str) -> tuple[dict, bool, set]:
    """(scores of the items every run of the arm has, binary?, ids some run lacks)."""
    per_run = [{k: v for k, v in run.items.items() if k[0] == lang} for run in runs if run.arm == arm]
    if not per_run:
        return {}, False, set()
    keys = set.intersection(*(set(items) for items in per_run))
    partial = set.union(*(set(items) for items in per_run)) - keys
    scores = {key: sum(items[key] for items in per_run) / len(per_run) for key in keys}
    binary = len(per_run) == 1 and all(v in (0.0, 1.0) for v in scores.values())
    return scores, binary, partial


def _compare_arms(runs: list[Run], reference: str, arm: str, lang: str, metric: str) -> dict | None:
    """Paired test on the item ids both arms (all their runs) have; the others are counted as dropped."""
    ref_scores, ref_binary, ref_partial = _arm_item_scores(runs, reference, lang)
    arm_scores, arm_binary, arm_partial = _arm_item_scores(runs, arm, lang)
    if not ref_scores and not arm_scores:
        return None
    common = sorted(set(ref_scores) & set(arm_scores))
    dropped = len((set(ref_scores) | set(arm_scores) | ref_partial | arm_partial) - set(common))
    if not common:
        raise ReportError(f"{bench_label(runs)}: arms {reference!r} and {arm!r} share no item id for language "
                          f"{lang!r}; they were evaluated on different item sets, so they cannot be paired")
    a, b = [ref_scores[k] for k in common], [arm_scores[k] for k in common]
    test = paired_bootstrap(a, b)
    result = {"arm": arm, "reference": reference, "lang": lang, "metric": metric, "n_items": len(common),
              "n_dropped": dropped, **test, "significant": test["p"] < ALPHA, "p_mcnemar": None}
    if ref_binary and arm_binary:
        result["p_mcnemar"] = mcnemar_exact(a, b)["p"]
    return result


def bench_label(runs: list[Run]) -> str:
    return f"eval set {runs[0].benchmark}" if runs else "report"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _p(p: float) -> str:
    return "p<0.0001" if p < 1e-4 else f"p={p:.3g}"


def outcome_lines(report: dict) -> list[str]:
    """Plain-language outcome: one line per arm and eval set."""
    lines = []
    for bench in report["benchmarks"]:
        for arm in bench["arms"][1:]:
            comps = [c for c in bench["comparisons"] if c["arm"] == arm]
            head = f"- **{arm} vs {bench['reference']}** on {bench['name']} ({bench['metric']}): "
            if not comps:
                lines.append(head + "no paired items (samples files missing); no test.")
                continue
            better = [f"{c['lang']} ({_pts(c['diff'])} pts, {_p(c['p'])})" for c in comps if c["significant"]
                      and c["diff"] > 0]
            worse = [f"{c['lang']} ({_pts(c['diff'])} pts, {_p(c['p'])})" for c in comps if c["significant"]
                     and c["diff"] < 0]
            same = [f"{c['lang']} ({_pts(c['diff'])}, {_p(c['p'])})" for c in comps if not c["significant"]]
            parts = []
            if better:
                parts.append("significantly **better** on " + ", ".join(better))
            if worse:
                parts.append("significantly **worse** on " + ", ".join(worse))
            if same:
                parts.append(("**no significant difference** in any language: " if not better and not worse
                              else "no significant difference on ") + ", ".join(same))
            dropped = sum(c.get("n_dropped", 0) for c in comps)
            if dropped:
                parts.append(f"paired on the common item ids only: {dropped} item(s) not evaluated in every run "
                             "were dropped")
            lines.append(head + "; ".join(parts) + ".")
    return lines


def render_markdown(report: dict, plots: list[str]) -> str:
    lines = ["# sara-moe report", "", "## Outcome", "",
             f"Each arm vs the reference arm, per language. Test: {report['test']}; "
             "differences in accuracy points (×100).", "", *outcome_lines(report), ""]
    for bench in report["benchmarks"]:
        arms = bench["arms"]
        lines += [f"## {bench['name']} — {bench['metric']} (mean ± std over runs)", "",
                  "| lang | " + " | ".join(arms) + " | " +
                  " | ".join(f"Δ {a} − {arms[0]} [95% CI], p" for a in arms[1:]) + " |",
                  "|---" * (1 + 2 * len(arms) - 1) + "|"]
        for lang, cells in bench["per_language"].items():
            row = [lang]
            for arm in arms:
                c = cells.get(arm)
                row.append(f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f} (runs={c['n_runs']}, n={c['n_items']})"
                           if c else "—")
            for arm in arms[1:]:
                c = next((c for c in bench["comparisons"] if c["arm"] == arm and c["lang"] == lang), None)
                row.append("—" if c is None else f"{_pts(c['diff'])} [{_pts(c['ci_low'])}, {_pts(c['ci_high'])}], "
                           f"{_p(c['p'])}{' *' if c['significant'] else ''}")
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "`*` significant at α = 0.05. McNemar exact p (single binary run per arm) in report.json.", ""]
    lines += routing_markdown(report) + neuron_markdown(report.get("neurons"))
    lines += monitor_markdown(report.get("monitor", {}))
    lines += ["## Arms", ""] + [f"- **{arm}**: {', '.join(sources)}" for arm, sources in report["arms"].items()]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _plots(folder: Path, report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for bench in report["benchmarks"]:
        langs, arms = list(bench["per_language"]), bench["arms"]
        width = 0.8 / len(arms)
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(langs) + 2), 3.6))
        for k, arm in enumerate(arms):
            cells = [bench["per_language"][lang].get(arm) for lang in langs]
            xs = [i + (k - (len(arms) - 1) / 2) * width for i in range(len(langs))]
            ax.bar(xs, [100 * c["mean"] if c else 0 for c in cells], width,
                   yerr=[100 * c["std"] if c else 0 for c in cells], capsize=3, label=arm)
        ax.set_xticks(range(len(langs)), langs)
        ax.set_ylabel(f"{bench['metric']} (%)")
        ax.set_title(f"{bench['name']}: mean ± std over runs")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = "accuracy_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", bench["name"]) + ".png"
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names


def build_report(run_dirs: list, output_dir, labels: list | None = None, baseline: str | None = None,
                 before_analysis: str | None = None, overwrite: bool = False, neurons: list | None = None) -> dict:
    artifacts.claim(output_dir, "report.json", overwrite)
    if not run_dirs:
        raise ReportError("no run dirs given")
    if labels is not None and len(labels) != len(run_dirs):
        raise ReportError(f"--labels has {len(labels)} names for {len(run_dirs)} run dirs; give one per run dir")
    neuron_section = read_comparisons(neurons) if neurons else None  # cheap checks first, before anything is written
    runs = [run for i, d in enumerate(run_dirs) for run in load_runs(d, labels[i] if labels else None)]
    before = None
    if before_analysis:
        p = Path(before_analysis)
        before = _read_analysis([p, p / "analysis.json"])
        if before is None:
            raise ReportError(f"{p}: no analysis.json (--before-analysis)")
    report = compare(runs, baseline)
    if neuron_section:
        report["neurons"] = neuron_section
    curves = routing_curves(runs, list(report["arms"]), before)
    report["routing"] = curves
    report["routing_accuracy"] = routing_accuracy(runs)
    report["monitor"] = monitor_curves(runs, list(report["arms"]))
    config = artifacts.config_dict(ReportConfig(str(output_dir), [str(d) for d in run_dirs], labels, baseline,
                                                before_analysis, overwrite, neurons))
    report["metadata"] = artifacts.run_metadata(config, seed=0)
    with artifacts.publishing(output_dir, overwrite, primary="report.json") as tmp:
        plots = (_plots(tmp, report) + plot_routing_curves(tmp, curves)
                 + plot_routing_accuracy(tmp, report["routing_accuracy"]) + plot_monitor_curves(tmp, report["monitor"]))
        report["routing_maps"] = plot_arm_maps(tmp, runs)
        plot_neurons(tmp, neuron_section)  # names recorded in report["neurons"], drawn in its section
        report["plots"] = plots
        write_html(tmp / "report.html", report, runs, before, outcome_lines(report))
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        (tmp / "report.md").write_text(render_markdown(report, plots), encoding="utf-8")
        (tmp / "report_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    artifacts.wait_for_main()  # under a launcher rank 0 wrote the folder (artifacts); all return once it exists
    return report


def report_cli(argv=None) -> int:
    cfg = parse_config(ReportConfig, argv, "sara report", __doc__.split("\n\n")[0], positional="run_dirs")
    report = build_report(cfg.run_dirs, cfg.output_dir, cfg.labels, cfg.baseline, cfg.before_analysis, cfg.overwrite,
                          cfg.neurons)
    print("\n".join(outcome_lines(report)) or "no eval set is shared by two arms: nothing to compare")
    print(f"report written to {Path(cfg.output_dir) / 'report.md'}")
    return 0
