"""The routing monitor's series in `sara report`: read from each run's trainer_state.json, drawn per arm.

    from sara_moe.reporting.monitor_curves import monitor_series, monitor_curves, plot_monitor_curves
    series = monitor_series(json.load(open("runs/sara/trainer_state.json")))  # {"js": {"sw": {...}}, ...}
    curves = monitor_curves(runs, arms)        # {arm: [one entry per training run of the arm]}
    plot_monitor_curves(folder, curves)        # monitor_js.png, monitor_english_drift.png, monitor_load.png

**Where.** A run's training folder is the first of: the evaluated adapter dir, the evaluated
model dir (the results' `adapter` / `model`), the eval folder, its parent (`runs/sara/eval` →
`runs/sara`) that holds a `trainer_state.json`; its `sara_run.json` `monitor` entry (probe
source, languages, layers, drift baseline, monitor_steps), when present, is carried along.
Runs of one arm that share a training folder count once.

**What.** The monitor logs through `Trainer.log`, so every `log_history` entry holding a
`monitor/...` key is one monitor pass at that entry's `step`. Keys read:
`monitor/js/<lang>` (mean over the aligned layers of the probe JS to the English parallel
text) and `.../layer_<L>`, `monitor/english_drift` (and per layer), `monitor/load_entropy/layer_<L>`,
`monitor/dead_experts/layer_<L>`, `monitor/seconds`; other `monitor/` keys are ignored. A series
is the list of (step, value) pairs in log order; a run without monitor keys has no series, draws
no curve and raises nothing.

**Plots.** `monitor_js.png`: one panel per language, one line per training run (colour = arm);
`monitor_english_drift.png`: one line per run; `monitor_load.png`: per run, load entropy and
the share of dead experts, one line per aligned layer. Each file only when some run has its keys.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sara_moe.runtime.artifacts import ArtifactError

_KEY = re.compile(r"^monitor/(?:(?P<js>js)/(?P<lang>[^/]+)|(?P<drift>english_drift)|"
                  r"(?P<load>load_entropy|dead_experts)(?=/))(?:/layer_(?P<layer>\d+))?$")


def _add(series: dict, step, value) -> None:
    series.setdefault("steps", []).append(int(step))
    series.setdefault("values", []).append(float(value))


def monitor_series(state: dict) -> dict:
    """The monitor series of one trainer_state.json; {} when it logged none (see the module docstring).

    {"js": {lang: S}, "js_layers": {lang: {layer: S}}, "english_drift": S, "english_drift_layers":
    {layer: S}, "load_entropy": {layer: S}, "dead_experts": {layer: S}, "seconds": S}, each S a
    {"steps": [...], "values": [...]}; only the keys that were logged.
    """
    out: dict = {}
    for entry in state.get("log_history") or []:
        if "step" not in entry:
            continue
        for key, value in entry.items():
            match = _KEY.match(key)
            if key == "monitor/seconds":
                target = out.setdefault("seconds", {})
            elif match is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            elif match["js"]:
                target = (out.setdefault("js_layers", {}).setdefault(match["lang"], {}) if match["layer"]
                          else out.setdefault("js", {})).setdefault(
                    int(match["layer"]) if match["layer"] else match["lang"], {})
            elif match["drift"]:
                target = (out.setdefault("english_drift_layers", {}).setdefault(int(match["layer"]), {})
                          if match["layer"] else out.setdefault("english_drift", {}))
            else:
                target = out.setdefault(match["load"], {}).setdefault(int(match["layer"]), {})
            _add(target, entry["step"], value)
    by_layer = [out.get(name, {}) for name in ("english_drift_layers", "load_entropy", "dead_experts")]
    for group in by_layer + list(out.get("js_layers", {}).values()):
        ordered = sorted(group.items())
        group.clear()
        group.update(ordered)
    return out


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def training_folder(run) -> Path | None:
    """The folder with the trainer_state.json of the model this run evaluated (see the module docstring)."""
    folder = Path(run.source).parent
    candidates = [run.results.get("adapter"), run.results.get("model"), folder, folder.parent]
    for candidate in candidates:
        if candidate and (Path(candidate) / "trainer_state.json").is_file():
            return Path(candidate)
    return None


def monitor_curves(runs: list, arms: list[str]) -> dict:
    """{arm: [{"run", "trainer_state", "label", "series", "monitor"?}]}: arms whose runs logged monitor keys."""
    curves: dict = {}
    for arm in arms:
        seen = set()
        for run in runs:
            folder = training_folder(run) if run.arm == arm else None
            if folder is None or folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            state_path = folder / "trainer_state.json"
            series = monitor_series(_read(state_path))
            if not series:
                continue
            entry = {"run": run.source, "trainer_state": str(state_path), "label": _label(folder), "series": series}
            run_file = folder / "sara_run.json"
            if run_file.is_file() and "monitor" in (info := _read(run_file)):
                entry["monitor"] = info["monitor"]
            curves.setdefault(arm, []).append(entry)
    return curves


def _label(folder: Path) -> str:
    resolved = folder.resolve()
    return resolved.name if not resolved.name.startswith("checkpoint-") else f"{resolved.parent.name}/{resolved.name}"


def curve_lines(curves: dict) -> list[tuple[str, str, int, dict]]:
    """(arm, run label, arm index, series) for every training run with monitor series."""
    return [(arm, entry["label"], k, entry["series"]) for k, (arm, entries) in enumerate(curves.items())
            for entry in entries]


def plot_monitor_curves(folder: Path, curves: dict) -> list[str]:
    """The monitor PNGs present in `curves` (see the module docstring); their file names."""
    lines = curve_lines(curves)
    if not lines:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    langs = sorted({lang for *_, series in lines for lang in series.get("js", {})})
    if langs:
        fig, axes = plt.subplots(1, len(langs), figsize=(4 * len(langs) + 1, 3.4), squeeze=False)
        for ax, lang in zip(axes[0], langs):
            for arm, label, k, series in lines:
                if lang in series.get("js", {}):
                    s = series["js"][lang]
                    ax.plot(s["steps"], s["values"], marker=".", color=f"C{k}", label=f"{arm}: {label}")
            ax.set_title(f"{lang}: probe routing JS to English", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("JS (nats), mean over aligned layers", fontsize=8)
            ax.legend(fontsize=7)
        names.append(_save(plt, fig, folder / "monitor_js.png"))
    drifting = [line for line in lines if "english_drift" in line[3]]
    if drifting:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for arm, label, k, series in drifting:
            s = series["english_drift"]
            ax.plot(s["steps"], s["values"], marker=".", color=f"C{k}", label=f"{arm}: {label}")
        ax.set_xlabel("step")
        ax.set_ylabel("JS to the base model (nats)")
        ax.set_title("English drift: current English routing vs the base model's", fontsize=9)
        ax.legend(fontsize=7)
        names.append(_save(plt, fig, folder / "monitor_english_drift.png"))
    loaded = [line for line in lines if "load_entropy" in line[3] or "dead_experts" in line[3]]
    if loaded:
        fig, axes = plt.subplots(len(loaded), 2, figsize=(10, 3.2 * len(loaded)), squeeze=False)
        for row, (arm, label, _, series) in zip(axes, loaded):
            for ax, key, title in ((row[0], "load_entropy", "expert-load entropy (nats)"),
                                   (row[1], "dead_experts", "share of experts with no probe token")):
                for layer, s in series.get(key, {}).items():
                    ax.plot(s["steps"], s["values"], marker=".", label=f"layer {layer}")
                ax.set_title(f"{arm}: {label}: {title}", fontsize=9)
                if key == "dead_experts":
                    ax.set_ylim(-0.03, 1.03)  # a share: 0 (every expert used) to 1
                ax.set_xlabel("step")
                ax.legend(fontsize=7)
        names.append(_save(plt, fig, folder / "monitor_load.png"))
    return names


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def monitor_markdown(curves: dict) -> list[str]:
    """report.md's monitor section: per training run, the last pass's figures and its probe."""
    lines = []
    for arm, label, _, series in curve_lines(curves):
        if not lines:
            lines = ["## Training monitor", "",
                     "Probe routing JS to English (mean over aligned layers) and English drift from each run's "
                     "trainer_state.json; curves in monitor_*.png and report.html.", ""]
        last = [f"{lang} JS {s['values'][-1]:.4f}" for lang, s in series.get("js", {}).items()]
        if "english_drift" in series:
            last.append(f"English drift {series['english_drift']['values'][-1]:.4f}")
        steps = sorted(set(passes(series)))
        lines.append(f"- **{arm}** ({label}): {len(steps)} monitor pass(es), steps {steps[0]}–{steps[-1]}; "
                     f"at step {steps[-1]}: " + (", ".join(last) or "no JS or drift keys"))
    for arm, entries in curves.items():
        for entry in (e for e in entries if isinstance(e.get("monitor"), dict)):
            described = [f"{key}: {len(value)} entries" if isinstance(value, list) and len(value) > 8 else
                         f"{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}"
                         for key, value in entry["monitor"].items()]
            lines.append(f"  - {arm} ({entry['label']}) monitor settings (sara_run.json): " + "; ".join(described))
    return lines + [""] if lines else []


def passes(series: dict) -> list[int]:
    """The steps of the run's monitor passes (the steps of any of its series, in log order, repeated)."""
    found = []
    for value in series.values():
        stack = [value]
        while stack:
            node = stack.pop()
            if "steps" in node:
                found += node["steps"]
            else:
                stack += list(node.values())
    return found
