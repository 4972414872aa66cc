"""report.html: the report as one self-contained, interactive page (plotly, its runtime inlined).

    from sara_moe.reporting.html_report import page_figures, render_html, write_html, figure_data
    figures = page_figures(report, runs, before_analysis)   # [{"id", "kind", "arm"?, "state"?, "band"?, "figure"}]
    page = render_html(report, figures, outcome_lines)      # the whole page as a string
    write_html("out/report.html", report, runs, before_analysis, outcome_lines)  # what build_report does
    figure_data(page)                                       # {div id: figure}: the numbers read back

Opens offline from a file: the plotly.js bundle of the installed `plotly` package
(`plotly.offline.get_plotlyjs`) and the style are inlined, nothing is fetched. Each figure's
JSON sits in a `<script type="application/json" class="sara-figure">` block (plain lists, so a
reader or a test can read the numbers back) and a few lines of glue draw it with
`Plotly.newPlot` into the `<div class="sara-plot">` it names, and drive the two selectors.

**Heatmaps.** Per arm, from its first run's `analysis.json` (after training) and the analysis
before training (the run's `analysis_before`, else `--before-analysis`): the share of dispatched
slots per expert at each MoE layer for each language (`experts.counts[lang][layer][e]` over the
layer's total for that language, as `expert_language_map.png` draws it), one figure per layer
band (`all_pairs_js.bands`: early / middle = the recommended band / late; all layers when the
analysis has no bands; the bands of the analysis before training when there is one, so before
and after show the same layers) holding one heatmap trace per language (rows = the band's layers,
columns = experts; hover shows the value). Before and after sit side by side. Analyses
without `experts` (older `sara analyze`) give no heatmap. The colour scale (0 to the largest
share on the page) is shared by every heatmap so colours compare across arms.
**Selectors.** Language: shows that language's trace in every heatmap and monitor JS plot.
Layer band: shows only that band's heatmaps (or all).
**Also.** The accuracy table with the paired tests of report.json (Δ, 95% CI, bootstrap p,
McNemar p), the outcome lines, routing JS per MoE layer before / after, and the routing
monitor's curves (see `monitor_curves`): probe JS per language, English drift, load entropy
and dead experts per layer; with `--neurons`, the language-neuron tables (`neuron_panels`) as plain tables.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from sara_moe.reporting.monitor_curves import curve_lines
from sara_moe.reporting.neuron_panels import neuron_html

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; } h3 { font-size: 1rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.controls { position: sticky; top: 0; background: #fff; padding: 0.5rem 0; border-bottom: 1px solid #ddd; z-index: 10; }
.side-by-side { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
.note { color: #666; font-size: 0.85rem; }
"""

# the only hand-written script: draw each figure from its JSON block, then the two selectors
_GLUE = """
(function () {
  var plots = function () { return Array.prototype.slice.call(document.querySelectorAll('.sara-plot')); };
  var drawn = Array.prototype.slice.call(document.querySelectorAll('script.sara-figure')).map(function (node) {
    var figure = JSON.parse(node.textContent);
    return Plotly.newPlot(node.dataset.target, figure.data, figure.layout, {displaylogo: false, responsive: true});
  });
  function showLanguage(lang) {
    return Promise.all(plots().map(function (gd) {
      var index = [], visible = [];
      gd.data.forEach(function (trace, i) {
        if (trace.meta && trace.meta.lang !== undefined) { index.push(i); visible.push(trace.meta.lang === lang); }
      });
      return index.length ? Plotly.restyle(gd, {visible: visible}, index) : null;
    }));
  }
  function showBand(band) {
    plots().forEach(function (gd) {
      if (!gd.dataset.band) return;
      var on = band === 'all' || gd.dataset.band === band;
      gd.style.display = on ? '' : 'none';
      if (on) Plotly.Plots.resize(gd);
    });
  }
  var langSelect = document.getElementById('lang-select'), bandSelect = document.getElementById('band-select');
  Promise.all(drawn).then(function () {
    langSelect.addEventListener('change', function () { showLanguage(langSelect.value); });
    bandSelect.addEventListener('change', function () { showBand(bandSelect.value); });
    return showLanguage(langSelect.value);
  }).then(function () { document.body.dataset.ready = 'true'; });
})();
"""


def dispatch_shares(analysis: dict) -> dict | None:
    """{lang: [[share of dispatched slots per expert] per MoE layer]} from `experts.counts`; None without."""
    experts = analysis.get("experts")
    if not experts or "counts" not in experts:
        return None
    shares = {}
    for lang, per_layer in zip(experts["langs"], experts["counts"]):
        shares[lang] = [[c / sum(row) if sum(row) else 0.0 for c in row] for row in per_layer]
    return shares


def layer_bands(analysis: dict) -> dict:
    """{band name: its MoE layers}: the analysis' early / middle / late bands, else one band of all layers."""
    bands = (analysis.get("all_pairs_js") or {}).get("bands")
    return {name: list(layers) for name, layers in bands.items()} if bands else {"all layers": analysis["moe_layers"]}


def _arm_analyses(runs, arm: str, before_global: dict | None) -> dict:
    run = next((r for r in runs if r.arm == arm and r.analysis), None)
    if run is None:
        return {}
    before = run.analysis_before or before_global
    return {state: a for state, a in (("before", before), ("after", run.analysis)) if a and dispatch_shares(a)}


def _slug(*parts) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9]+", "_", str(p)).strip("_") or "x" for p in parts)


def _heatmap(arm: str, state: str, band: str, layers: list, analysis: dict, shares: dict, default: str,
             zmax: float) -> dict:
    index = [analysis["moe_layers"].index(x) for x in layers]
    traces = [{"type": "heatmap", "name": lang, "meta": {"lang": lang}, "visible": lang == default,
               "z": [shares[lang][i] for i in index], "x": list(range(len(shares[lang][index[0]]))),
               "y": [f"layer {x}" for x in layers], "zmin": 0, "zmax": zmax, "colorscale": "Viridis",
               "colorbar": {"title": {"text": "share"}},
               "hovertemplate": "%{y}, expert %{x}<br>share of slots %{z:.4f}<extra>" + lang + "</extra>"}
              for lang in shares]
    span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"
    return {"data": traces, "layout": {
        "title": {"text": f"{arm} · {state} · {band} ({span})", "font": {"size": 13}},
        "xaxis": {"title": {"text": "expert"}, **({"dtick": 1} if len(traces[0]["x"]) <= 32 else {})},
        "yaxis": {"autorange": "reversed"}, "height": 160 + 26 * len(layers),
        "margin": {"l": 70, "r": 20, "t": 40, "b": 40}}}


def _page_language(report: dict, runs, before_global) -> str | None:
    """The language shown first: the first one that is no analysis' anchor."""
    langs, anchors = [], set()
    for arm in report["arms"]:
        for analysis in _arm_analyses(runs, arm, before_global).values():
            langs += [lang for lang in dispatch_shares(analysis) if lang not in langs]
            anchors.add(analysis.get("anchor"))
    for _, _, _, series in curve_lines(report.get("monitor", {})):
        langs += [lang for lang in series.get("js", {}) if lang not in langs]
    return next((lang for lang in langs if lang not in anchors), langs[0] if langs else None)


def page_figures(report: dict, runs, before_global: dict | None = None) -> list[dict]:
    """Every figure of report.html as plotly JSON (plain lists); see the module docstring."""
    default = _page_language(report, runs, before_global)
    per_arm = {arm: _arm_analyses(runs, arm, before_global) for arm in report["arms"]}
    zmax = max((v for analyses in per_arm.values() for a in analyses.values()
                for rows in dispatch_shares(a).values() for row in rows for v in row), default=1.0) or 1.0
    figures = []
    for arm, analyses in per_arm.items():
        bands = layer_bands(next(iter(analyses.values()))) if analyses else {}  # before's, so both show one rows set
        for state, analysis in analyses.items():
            shares = dispatch_shares(analysis)
            for band, layers in bands.items():
                layers = [x for x in layers if x in analysis["moe_layers"]]
                if not layers:
                    continue
                key = _slug("heatmap", arm, state, band)
                key += f"-{len(figures)}" if any(f["id"] == key for f in figures) else ""  # arms "a b" and "a_b"
                figures.append({"id": key, "kind": "heatmap", "arm": arm,
                                "state": state, "band": band, "layers": layers,
                                "figure": _heatmap(arm, state, band, layers, analysis, shares, default, zmax)})
    if report.get("routing"):
        traces = []
        for arm, entry in report["routing"].items():
            traces.append({"type": "scatter", "mode": "lines+markers", "name": f"{arm} (after)",
                           "x": entry["layers"], "y": entry["after"]})
            if "before" in entry:
                traces.append({"type": "scatter", "mode": "lines", "line": {"dash": "dash"},
                               "name": f"{arm} (before)", "x": entry["layers"], "y": entry["before"]})
        figures.append({"id": "routing-js", "kind": "routing", "figure": _lines(
            traces, "routing JS to the anchor per MoE layer, mean over languages", "decoder layer", "JS (nats)")})
    return figures + _monitor_figures(report.get("monitor", {}), default)


def _lines(traces: list, title: str, xtitle: str, ytitle: str) -> dict:
    xaxis = {"title": {"text": xtitle}, **({"dtick": 1} if "layer" in xtitle else {})}
    return {"data": traces, "layout": {"title": {"text": title, "font": {"size": 13}}, "height": 360,
                                       "showlegend": True, "xaxis": xaxis, "yaxis": {"title": {"text": ytitle}},
                                       "margin": {"l": 60, "r": 20, "t": 40, "b": 40}}}


def _curve(name: str, series: dict, **extra) -> dict:
    return {"type": "scatter", "mode": "lines+markers", "name": name, "x": series["steps"],
            "y": series["values"], **extra}


def _monitor_figures(curves: dict, default: str | None) -> list[dict]:
    lines = curve_lines(curves)
    js = [_curve(f"{arm}: {label} · {lang}", s, meta={"lang": lang}, visible=lang == default,
                 line={"color": _color(k)})
          for arm, label, k, series in lines for lang, s in series.get("js", {}).items()]
    drift = [_curve(f"{arm}: {label}", series["english_drift"], line={"color": _color(k)})
             for arm, label, k, series in lines if "english_drift" in series]
    figures = []
    if js:
        figures.append({"id": "monitor-js", "kind": "monitor", "figure": _lines(
            js, "probe routing JS to English (mean over aligned layers), selected language", "step", "JS (nats)")})
    if drift:
        figures.append({"id": "monitor-english-drift", "kind": "monitor", "figure": _lines(
            drift, "English drift: JS of English routing to the base model's", "step", "JS (nats)")})
    for key, title in (("load_entropy", "expert-load entropy per aligned layer (nats)"),
                       ("dead_experts", "share of experts receiving no probe token, per aligned layer")):
        traces = [_curve(f"{arm}: {label} · layer {layer}", s) for arm, label, _, series in lines
                  for layer, s in series.get(key, {}).items()]
        if traces:
            figures.append({"id": f"monitor-{key.replace('_', '-')}", "kind": "monitor",
                            "figure": _lines(traces, title, "step", key.replace("_", " "))})
    return figures


def _color(k: int) -> str:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    return palette[k % len(palette)]


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _p(p: float | None) -> str:
    return "—" if p is None else ("<0.0001" if p < 1e-4 else f"{p:.3g}")


def accuracy_tables(report: dict) -> str:
    """The report's accuracy tables: mean ± std per arm, then Δ [95% CI], bootstrap p, McNemar p per arm."""
    out = []
    for bench in report["benchmarks"]:
        arms = bench["arms"]
        head = ["lang", *arms] + [h for arm in arms[1:] for h in (f"Δ {arm} − {arms[0]} [95% CI]", "p (bootstrap)",
                                                                  "p (McNemar)")]
        rows = []
        for lang, cells in bench["per_language"].items():
            row = [lang] + [f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f} (runs={c['n_runs']}, n={c['n_items']})"
                            if (c := cells.get(arm)) else "—" for arm in arms]
            for arm in arms[1:]:
                c = next((c for c in bench["comparisons"] if c["arm"] == arm and c["lang"] == lang), None)
                row += (["—", "—", "—"] if c is None else
                        [f"{_pts(c['diff'])} [{_pts(c['ci_low'])}, {_pts(c['ci_high'])}]",
                         _p(c["p"]) + (" *" if c["significant"] else ""), _p(c.get("p_mcnemar"))])
            rows.append(row)
        name, metric = html.escape(bench["name"]), html.escape(bench["metric"])
        out.append(f"<h3>{name} — {metric} (mean ± std over runs, %)</h3>"
                   "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
                   + "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>"
                                              for cell in row) + "</tr>" for row in rows) + "</table>")
    return "\n".join(out)


def _figure_block(entry: dict) -> str:
    from plotly.io.json import to_json_plotly

    data = to_json_plotly(entry["figure"]).replace("</", "<\\/")  # a "</script>" in a name cannot end the block
    band = f' data-band="{html.escape(entry["band"])}"' if entry["kind"] == "heatmap" else ""
    return (f'<div id="{entry["id"]}" class="sara-plot" data-kind="{entry["kind"]}"{band}></div>\n'
            f'<script type="application/json" class="sara-figure" data-target="{entry["id"]}">{data}</script>')


def _markdown_inline(line: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(line.lstrip("- ")))


def render_html(report: dict, figures: list[dict], outcome: list[str]) -> str:
    """The whole page; `outcome` = the report's plain-language outcome lines (Markdown bold allowed)."""
    from plotly.offline import get_plotlyjs

    langs = list(dict.fromkeys(t["meta"]["lang"] for f in figures for t in f["figure"]["data"] if "meta" in t))
    default = next((t["meta"]["lang"] for f in figures for t in f["figure"]["data"]
                    if "meta" in t and t.get("visible")), langs[0] if langs else "")
    bands = list(dict.fromkeys(f["band"] for f in figures if f["kind"] == "heatmap"))
    lang_options = "".join(f'<option value="{html.escape(x)}"{" selected" if x == default else ""}>{html.escape(x)}'
                           "</option>" for x in langs)
    band_options = '<option value="all">all bands</option>' + "".join(
        f'<option value="{html.escape(b)}">{html.escape(b)}</option>' for b in bands)
    parts = ["<h1>sara-moe report</h1>",
             '<div class="controls"><label>language <select id="lang-select">' + lang_options + "</select></label> "
             '<label>layer band <select id="band-select">' + band_options + "</select></label></div>",
             "<h2>Outcome</h2>", f'<p class="note">Test: {html.escape(report["test"])}.</p>',
             "<ul>" + "".join(f"<li>{_markdown_inline(line)}</li>" for line in outcome) + "</ul>",
             "<h2>Accuracy</h2>", accuracy_tables(report),
             '<p class="note">* significant at α = 0.05; differences in accuracy points (×100); McNemar exact p '
             "where both arms have one binary run.</p>", "<h2>Routing maps: share of dispatched slots per expert</h2>"]
    by_id = {f["id"]: f for f in figures}
    heatmaps = [f for f in figures if f["kind"] == "heatmap"]
    for arm in report["arms"]:
        mine = [f for f in heatmaps if f["arm"] == arm]
        parts.append(f"<h3>{html.escape(arm)}</h3>")
        if not mine:
            parts.append('<p class="note">no analysis.json with expert counts for this arm (run `sara analyze`).</p>')
            continue
        states = list(dict.fromkeys(f["state"] for f in mine))
        parts.append('<div class="side-by-side">' + "".join(
            f"<div><h3>{state}</h3>" + "\n".join(_figure_block(f) for f in mine if f["state"] == state) + "</div>"
            for state in states) + "</div>")
    if "routing-js" in by_id:
        parts += ["<h2>Routing divergence per layer</h2>", _figure_block(by_id["routing-js"])]
    parts += [neuron_html(report.get("neurons"))] if report.get("neurons") else []
    monitors = [f for f in figures if f["kind"] == "monitor"]
    parts.append("<h2>Training monitor</h2>")
    parts += [_figure_block(f) for f in monitors] or ['<p class="note">no run logged routing-monitor series.</p>']
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>sara-moe report</title>"
            f"<style>{_STYLE}</style><script>{get_plotlyjs()}</script></head>\n<body>\n" + "\n".join(parts)
            + f"\n<script>{_GLUE}</script>\n</body></html>\n")


def write_html(path, report: dict, runs, before_global: dict | None, outcome: list[str]) -> None:
    """report.html into `path` (a file of `build_report`'s staging folder, published with the report)."""
    Path(path).write_text(render_html(report, page_figures(report, runs, before_global), outcome), encoding="utf-8")


def figure_data(page: str) -> dict:
    """{div id: figure} read back from a report.html (its JSON blocks); for readers and tests."""
    blocks = re.findall(r'<script type="application/json" class="sara-figure" data-target="([^"]+)">(.*?)</script>',
                        page, flags=re.S)
    return {target: json.loads(text) for target, text in blocks}
