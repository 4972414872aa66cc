"""Language neurons in `sara report`: the `sara neurons --compare` numbers as tables, sentences, a plot.

    sara report RUN_DIR ... --output_dir runs/report --neurons runs/neurons_cmp [runs/other_cmp ...]

    from sara_moe.reporting.neuron_panels import read_comparisons, neuron_markdown, plot_neurons
    section = read_comparisons(["runs/neurons_cmp"])  # report.json["neurons"]; a bad file is refused in one line
    names = plot_neurons("runs/report", section)      # neurons_specific.png (one per comparison)
    lines = neuron_markdown(section)                  # report.md's section; neuron_html(section) for report.html

Each input is a `neurons_compare.json` (or the folder holding it) from `sara neurons --compare BASE
RUN ...` (`analysis.neuron_classes.compare`). Per method (LNP, LAPE), layer band and language the
section gives each type's count (routed neurons of that type serving the language, summed over the
band's MoE layers) in the base and in each run, with the change, and one sentence per run and band
naming every change. Per language it gives the overlap of its language neurons (specific + related)
with the anchor's in the base and each run, and the share of its specific neurons a run keeps
(Jaccard, base vs run); the comparison records these two over the whole model, not per band. Every
sentence is generated from the numbers. The plot: specific-neuron counts per language, one bar per
base / run, one panel per method and band.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from sara_moe.analysis.neuron_classes import TYPES

METHODS = {"lnp": "LNP", "lape": "LAPE"}
FIX = "run `sara neurons --compare BASE RUN ... --output_dir DIR` and give DIR"


class NeuronComparisonError(ValueError):
    """A neurons_compare.json that cannot be used; the message names the file and the fix."""


def _field(data: dict, path: list, file) -> object:
    node = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise NeuronComparisonError(f"{file}: field {'.'.join(map(str, path))!r} is missing: not a "
                                        f"`sara neurons --compare` output of this version; {FIX}")
        node = node[key]
    return node


def _number(data: dict, path: list, file, share: bool = False):
    value = _field(data, path, file)
    plain = isinstance(value, (int, float) if share else int) and not isinstance(value, bool)
    if not (plain or (share and value is None)):
        kind = "a share or null" if share else "an integer count"
        raise NeuronComparisonError(f"{file}: field {'.'.join(map(str, path))!r} is {value!r}, not {kind}; {FIX}")
    return value


def read_comparison(path) -> dict:
    """One checked comparison: {source, base, runs (label -> folder), anchor, langs, bands, methods}."""
    given = Path(path)
    file = given / "neurons_compare.json" if given.is_dir() else given
    if not file.is_file():
        raise NeuronComparisonError(f"--neurons {path}: no neurons_compare.json there; {FIX}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise NeuronComparisonError(f"{file}:{err.lineno}: not valid JSON ({err.msg}); {FIX}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise NeuronComparisonError(f"{file}: cannot be read ({err}); {FIX}") from None
    if not isinstance(data, dict):
        raise NeuronComparisonError(f"{file}: not a `sara neurons --compare` output (no JSON object); {FIX}")
    if str(data.get("format", "")).startswith("sara-moe-neurons"):
        raise NeuronComparisonError(f"{file}: a `sara neurons` output, not a comparison; {FIX} (it as BASE or RUN)")
    langs, bands, anchor = (_field(data, [key], file) for key in ("langs", "bands", "anchor"))
    if not (isinstance(langs, list) and langs and isinstance(bands, dict) and bands):
        raise NeuronComparisonError(f"{file}: fields 'langs' and 'bands' must be a non-empty list and mapping; {FIX}")
    labels = list(_field(data, ["methods", "lnp", "runs"], file))
    if not labels:
        raise NeuronComparisonError(f"{file}: field 'methods.lnp.runs' is empty: no run compared; {FIX}")
    for method in METHODS:
        root = ["methods", method]
        for t in TYPES:
            for band in bands:
                for lang in langs:
                    before = _number(data, [*root, "base", "counts", t, band, lang], file)
                    for label in labels:
                        after = _number(data, [*root, "runs", label, "counts", t, band, lang], file)
                        delta = _number(data, [*root, "runs", label, "delta", t, band, lang], file)
                        if delta != after - before:
                            raise NeuronComparisonError(
                                f"{file}: field {'.'.join([*root, 'runs', label, 'delta', t, band, lang])!r} is "
                                f"{delta}, not the run's count minus the base's ({after} - {before}); {FIX}")
        for lang in langs:
            _number(data, [*root, "base", "overlap_with_anchor", lang], file, share=True)
            for label in labels:
                _number(data, [*root, "runs", label, "overlap_with_anchor", lang], file, share=True)
                _number(data, [*root, "runs", label, "kept_specific", lang], file, share=True)
    return {"source": str(file), "base": data.get("base"), "runs": data.get("runs") or {x: x for x in labels},
            "anchor": anchor, "langs": langs, "bands": bands, "labels": labels,
            "methods": {m: data["methods"][m] for m in METHODS}}


def read_comparisons(paths: list) -> dict:
    """report.json's `neurons`: {"comparisons": [read_comparison(p) for p in paths]}."""
    return {"comparisons": [read_comparison(p) for p in paths]}


# ----------------------------------------------------------------------------- numbers as text


def _share(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def _span(layers: list) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"


def count_table(comp: dict, method: str) -> tuple[list, list]:
    """(head, rows): per band and language, each type's count `base → run (change)` for every run."""
    entry = comp["methods"][method]
    head = ["band", "lang"] + [f"{t}: base → {label}" for t in TYPES for label in comp["labels"]]
    rows = []
    for band in comp["bands"]:
        for lang in comp["langs"]:
            row = [band, lang]
            for t in TYPES:
                before = entry["base"]["counts"][t][band][lang]
                for label in comp["labels"]:
                    after = entry["runs"][label]["counts"][t][band][lang]
                    row.append(f"{before} → {after} ({after - before:+d})")
            rows.append(row)
    return head, rows


def overlap_table(comp: dict, method: str) -> tuple[list, list]:
    """(head, rows): per language, the overlap with the anchor base → run and the specific neurons kept."""
    entry, anchor = comp["methods"][method], comp["anchor"]
    head = (["lang"] + [f"overlap with {anchor}: base → {label}" for label in comp["labels"]]
            + [f"specific kept: {label}" for label in comp["labels"]])
    rows = []
    for lang in comp["langs"]:
        base = entry["base"]["overlap_with_anchor"][lang]
        rows.append([lang] + [f"{_share(base)} → {_share(entry['runs'][label]['overlap_with_anchor'][lang])}"
                              for label in comp["labels"]]
                    + [_share(entry["runs"][label]["kept_specific"][lang]) for label in comp["labels"]])
    return head, rows


def change_sentences(comp: dict, method: str) -> list[str]:
    """One line per run and band naming every count that changed from the base (or that none did)."""
    entry, lines = comp["methods"][method], []
    for label in comp["labels"]:
        run = entry["runs"][label]
        for band, layers in comp["bands"].items():
            changes = []
            for t in TYPES:
                for lang in comp["langs"]:
                    before, after = entry["base"]["counts"][t][band][lang], run["counts"][t][band][lang]
                    if after != before:
                        k = abs(after - before)
                        changes.append(f"{k} {'more' if after > before else 'fewer'} {lang}-{t} neuron"
                                       f"{'' if k == 1 else 's'} ({before} → {after})")
            lines.append(f"- **{label}** vs base in band {band} ({_span(layers)}): "
                         + ("; ".join(changes) if changes else "no type's count changed in any language") + ".")
        others = [lang for lang in comp["langs"] if lang != comp["anchor"]]
        overlaps = ", ".join(f"{lang} {_share(entry['base']['overlap_with_anchor'][lang])} → "
                             f"{_share(run['overlap_with_anchor'][lang])}" for lang in others)
        kept = ", ".join(f"{lang} {_share(run['kept_specific'][lang])}" for lang in comp["langs"])
        lines.append(f"- **{label}**: overlap of each language's language neurons with {comp['anchor']}'s, base → "
                     f"{label}: {overlaps or 'no other language'}; specific neurons kept from base (Jaccard): {kept}.")
    return lines


def _markdown_table(head: list, rows: list) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
            + ["| " + " | ".join(row) + " |" for row in rows])


def _intro(comp: dict) -> str:
    runs = ", ".join(f"**{label}** (`{comp['runs'].get(label, label)}`)" for label in comp["labels"])
    bands = ", ".join(f"{band} = {_span(layers)}" for band, layers in comp["bands"].items())
    return (f"Base `{comp['base']}` vs {runs}; bands: {bands}. Counts: routed neurons of each type serving the "
            f"language, summed over the band's MoE layers. Overlap: share of a language's specific + related "
            f"neurons that are also {comp['anchor']}'s; kept: Jaccard of its specific neurons in base and run "
            "(both over the whole model); — where the language has no such neurons.")


def neuron_markdown(section: dict | None) -> list[str]:
    """report.md's language-neuron section (empty without comparisons)."""
    lines = []
    for comp in (section or {}).get("comparisons", []):
        lines += [f"## Language neurons — {comp['source']}", "", _intro(comp), ""]
        for method, name in METHODS.items():
            lines += [f"### {name}", "", *change_sentences(comp, method), ""]
            for head, rows in (count_table(comp, method), overlap_table(comp, method)):
                lines += [*_markdown_table(head, rows), ""]
        lines += [f"![{name}]({name})" for name in comp.get("plots", [])] + [""]
    return lines


def neuron_html(section: dict | None) -> str:
    """The same tables as plain HTML for report.html ("" without comparisons)."""
    parts = []
    for comp in (section or {}).get("comparisons", []):
        parts += [f"<h2>Language neurons — {html.escape(comp['source'])}</h2>",
                  f'<p class="note">{html.escape(_intro(comp).replace("**", "").replace("`", ""))}</p>']
        for method, name in METHODS.items():
            parts.append(f"<h3>{name}</h3>")
            for head, rows in (count_table(comp, method), overlap_table(comp, method)):
                parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(
                    "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the plot


def plot_neurons(folder, section: dict | None) -> list[str]:
    """Per comparison, neurons_specific[_K].png: specific-neuron counts per language (grouped bars: base and
    each run), one panel per method (rows) and band (columns). Records the names in each comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = []
    for k, comp in enumerate((section or {}).get("comparisons", [])):
        langs, bands, series = comp["langs"], list(comp["bands"]), ["base", *comp["labels"]]
        width = 0.8 / len(series)
        panel = max(4.0, 0.5 * len(langs) * len(series))
        fig, axes = plt.subplots(len(METHODS), len(bands), squeeze=False,
                                 figsize=(panel * len(bands) + 1, 3.0 * len(METHODS)))
        for row, (method, title) in enumerate(METHODS.items()):
            entry = comp["methods"][method]
            for col, band in enumerate(bands):
                ax, top = axes[row][col], 0
                ax.set_title(f"{title} · {band} ({_span(comp['bands'][band])})", fontsize=9)
                for j, label in enumerate(series):
                    counts = (entry["base"] if label == "base" else entry["runs"][label])["counts"]["specific"][band]
                    xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(langs))]
                    ax.bar(xs, [counts[lang] for lang in langs], width, label=label)
                    top = max(top, *(counts[lang] for lang in langs))
                ax.set_ylim(0, 1.1 * max(top, 1))
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
                if top == 0:
                    ax.text(0.5, 0.5, "no specific neurons", transform=ax.transAxes, ha="center", fontsize=8)
                ax.set_xticks(range(len(langs)), langs)
                ax.set_ylabel("specific neurons" if col == 0 else "")
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        name = "neurons_specific.png" if k == 0 else f"neurons_specific_{k + 1}.png"
        fig.savefig(Path(folder) / name, dpi=110)
        plt.close(fig)
        comp["plots"] = [name]
        names.append(name)
    return names
