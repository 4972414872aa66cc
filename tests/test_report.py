"""sara report: hand-computed numbers on fixture results, paired tests on constructed cases, bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from sara_moe.reporting.report import ReportError, build_report, mcnemar_exact, paired_bootstrap

N = 40  # items per language


def _run(root: Path, name: str, correct: dict, analysis: dict | None = None) -> Path:
    """A fake `sara eval` output dir: results + samples where items [0, correct[lang]) are right."""
    out = root / name / "eval"
    out.mkdir(parents=True)
    rows = [{"id": f"q{i}", "lang": lang, "acc": float(i < k), "seed": 0} for lang, k in correct.items()
            for i in range(N)]
    (out / "samples_2026-01-01T00-00-00.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {"task": "mc", "metrics": ["acc"], "data": "sets/eval_mc.jsonl", "model": name, "steer": None,
               "samples_file": "samples_2026-01-01T00-00-00.jsonl",
               "per_language": {lang: {"acc": k / N, "n": N, "per_seed": [{"seed": 0, "acc": k / N}]}
                                for lang, k in correct.items()}}
    (out / "results_2026-01-01T00-00-00.json").write_text(json.dumps(results))
    if analysis:
        (root / name / "analysis.json").write_text(json.dumps(analysis))
    return out


def _analysis(rows: dict) -> dict:
    return {"moe_layers": [1, 2, 3], "metrics": {"js_pair_mean": rows}}


@pytest.fixture()
def arms(tmp_path):
    dirs = [
        _run(tmp_path, "sft-seed0", {"sw": 20, "en": 30}, _analysis({"sw": [0.4, 0.3, 0.2], "yo": [0.2, 0.1, 0.4]})),
        _run(tmp_path, "sft-seed1", {"sw": 22, "en": 30}),
        _run(tmp_path, "sara-seed0", {"sw": 36, "en": 30}, _analysis({"sw": [0.3, 0.2, 0.1], "yo": [0.1, 0.2, 0.3]})),
        _run(tmp_path, "sara-seed1", {"sw": 34, "en": 30}, _analysis({"sw": [0.1, 0.0, 0.1], "yo": [0.1, 0.2, 0.1]})),
    ]
    before = tmp_path / "base_analysis.json"
    before.write_text(json.dumps(_analysis({"sw": [0.5, 0.5, 0.5], "yo": [0.3, 0.3, 0.3]})))
    return tmp_path, dirs, before


def test_report_numbers_equal_hand_computed(arms):
    root, dirs, before = arms
    report = build_report(dirs, root / "report", before_analysis=str(before))
    assert list(report["arms"]) == ["sft", "sara"]  # arm = run dir name without the seed marker
    [bench] = report["benchmarks"]
    assert bench["name"] == "mc:eval_mc" and bench["reference"] == "sft"
    sw = bench["per_language"]["sw"]
    assert sw["sft"]["mean"] == pytest.approx(0.525) and sw["sara"]["mean"] == pytest.approx(0.875)
    assert sw["sft"]["std"] == pytest.approx(math.sqrt(2 * 0.025 ** 2)) and sw["sara"]["n_runs"] == 2
    comps = {c["lang"]: c for c in bench["comparisons"]}
    # per-item means over runs: sara - sft sums to (34 + 2*0.5) - (20 + 2*0.5) = 14 over 40 items
    assert comps["sw"]["diff"] == pytest.approx(14 / 40) and comps["sw"]["significant"]
    assert comps["sw"]["p"] < 0.001 and comps["sw"]["p_mcnemar"] is None
    assert comps["en"]["diff"] == 0 and comps["en"]["p"] == 1.0 and not comps["en"]["significant"]
    # routing: mean over languages, then over the arm's runs
    assert report["routing"]["sara"]["after"] == pytest.approx([0.15, 0.15, 0.15])
    assert report["routing"]["sara"]["before"] == pytest.approx([0.4, 0.4, 0.4])
    assert report["routing"]["sft"]["after"] == pytest.approx([0.3, 0.2, 0.3])
    out = root / "report"
    assert {"report.md", "report.json", "routing_js.png", "accuracy_mc_eval_mc.png", "report_config.json"} <= \
        {p.name for p in out.iterdir()}
    first_screen = "\n".join((out / "report.md").read_text().splitlines()[:12])
    assert "paired bootstrap" in first_screen
    assert "**sara vs sft**" in first_screen and "significantly **better** on sw (+35.0 pts" in first_screen
    assert "no significant difference on en" in first_screen
    assert json.loads((out / "report.json").read_text())["benchmarks"][0]["per_language"]["en"]["sara"]["mean"] == 0.75


def test_labels_baseline_and_null_outcome(arms):
    root, dirs, _ = arms
    report = build_report(dirs[:2], root / "r2", labels=["a", "b"], baseline="b")
    [bench] = report["benchmarks"]
    assert bench["arms"] == ["b", "a"]
    comps = {c["lang"]: c for c in bench["comparisons"]}
    assert comps["sw"]["diff"] == pytest.approx(-2 / 40) and not comps["sw"]["significant"]
    assert comps["sw"]["p_mcnemar"] == pytest.approx(0.5)  # 2 discordant pairs, both one way: 2 * 0.5**2
    text = (root / "r2" / "report.md").read_text()
    assert "**no significant difference** in any language" in text


def test_mcnemar_known_answers():
    assert mcnemar_exact([0] * 10, [1] * 10)["p"] == pytest.approx(2 / 1024)
    assert mcnemar_exact([0] * 8 + [1] * 2, [1] * 8 + [0] * 2)["p"] == pytest.approx(112 / 1024)
    assert mcnemar_exact([1, 0, 1, 0], [1, 0, 1, 0])["p"] == 1.0


def test_paired_bootstrap_known_answers():
    certain = paired_bootstrap([0.0] * 30, [1.0] * 30)
    assert certain == {"diff": 1.0, "ci_low": 1.0, "ci_high": 1.0, "p": 0.0}
    symmetric = paired_bootstrap([0, 1] * 50, [1, 0] * 50)
    assert symmetric["diff"] == 0 and symmetric["p"] > 0.9
    # large n: the bootstrap agrees with the normal approximation of the paired mean
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    for boost in (20, 40, 60):  # p from ~0.8 down to ~0.03
        a[:boost], b[:boost] = 0, 1
        d = b - a
        z = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
        p_normal = math.erfc(abs(z) / math.sqrt(2))
        assert paired_bootstrap(a, b)["p"] == pytest.approx(p_normal, abs=0.015)


def test_bad_report_input(arms, tmp_path):
    root, dirs, _ = arms
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ReportError, match=r"empty_run: no results_\*\.json"):
        build_report([dirs[0], empty], tmp_path / "r")
    with pytest.raises(ReportError, match="--labels has 1 names for 2 run dirs"):
        build_report(dirs[:2], tmp_path / "r", labels=["x"])
    results = next(dirs[1].glob("results_*.json"))
    data = json.loads(results.read_text())
    data["per_language"]["sw"]["n"] = 0
    results.write_text(json.dumps(data))
    with pytest.raises(ReportError, match=r"per_language\['sw'\] has zero items \(field 'n'\)"):
        build_report(dirs[:2], tmp_path / "r")


def test_report_cli(arms, capsys):
    from sara_moe.cli import main

    root, dirs, _ = arms
    assert main(["report", *map(str, dirs), "--output-dir", str(root / "cli")]) == 0
    assert "sara vs sft" in capsys.readouterr().out
    assert main(["report", str(root / "missing"), "--output-dir", str(root / "cli2")]) == 1
    err = capsys.readouterr().err.strip()
    assert "missing: no such run dir" in err and "\n" not in err


def test_routing_similarity_vs_accuracy_fit(arms):
    """Three (run, language) points: sw of sft-seed0, sara-seed0, sara-seed1 (the runs with an analysis)."""
    from sara_moe.reporting.routing_panels import pearson_with_ci

    root, dirs, _ = arms
    report = build_report(dirs, root / "fit")
    [fit] = report["routing_accuracy"]
    # x = mean js_pair_mean over the layers (no recommended band in these analyses), y = sw accuracy
    x, y = [0.3, 0.2, 0.2 / 3], [20 / N, 36 / N, 34 / N]
    got = sorted((p["divergence"], p["score"]) for p in fit["points"])
    assert [a for a, _ in got] == pytest.approx(sorted(x)) and [b for _, b in got] == pytest.approx([y[2], y[1], y[0]])
    mx, my = sum(x) / 3, sum(y) / 3
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    r = sxy / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert fit["r"] == pytest.approx(r) and r == pytest.approx(-0.7512, abs=1e-4)
    assert fit["slope"] == pytest.approx(sxy / sum((a - mx) ** 2 for a in x))
    assert -1 <= fit["ci_low"] <= fit["r"] <= fit["ci_high"] <= 1 and fit["n"] == 3
    text = (root / "fit" / "report.md").read_text()
    assert "r = -0.751" in text and (root / "fit" / "routing_vs_accuracy_mc_eval_mc.png").is_file()
    # a perfect line: every resample with spread has r = -1; two points: no fit
    line = pearson_with_ci([0, 1, 2, 3], [3, 2, 1, 0])
    assert line["r"] == pytest.approx(-1) and line["ci_low"] == pytest.approx(-1) and line["ci_high"] == pytest.approx(-1)
    assert pearson_with_ci([0, 1], [1, 0])["r"] is None


def test_report_redraws_the_analysis_maps(tiny_model_dir, example_corpus, tmp_path):
    from sara_moe.analysis.analyze import analyze

    run = _run(tmp_path, "base", {"sw": 20, "es": 30})
    analyze(tiny_model_dir("qwen3_moe"), example_corpus, tmp_path / "base" / "analysis", progress=False)
    report = build_report([run], tmp_path / "report")
    names = report["routing_maps"]["base"]
    assert {"base_routing_entropy.png", "base_all_pairs_js.png", "base_expert_language_map.png",
            "base_hidden_alignment.png"} <= set(names)
    assert all((tmp_path / "report" / name).is_file() for name in names)
    assert "## Routing maps — base" in (tmp_path / "report" / "report.md").read_text()
    [fit] = report["routing_accuracy"]
    assert fit["r"] is None and "2 point(s)" in fit["reason"]  # es and sw of one checkpoint


# ----------------------------------------------------------------------------- training monitor curves and report.html


def _monitor_entry(step: int, js: dict, drift: float, layers=(1, 2)) -> dict:
    """One monitor pass as `Trainer.log` records it in log_history (the monitor's key contract)."""
    entry = {"epoch": step / 10, "step": step, "monitor/english_drift": drift, "monitor/seconds": 0.01 * step}
    for lang, value in js.items():
        entry[f"monitor/js/{lang}"] = value
        entry.update({f"monitor/js/{lang}/layer_{layer}": value + 0.01 * layer for layer in layers})
    entry.update({f"monitor/english_drift/layer_{layer}": drift * layer for layer in layers})
    entry.update({f"monitor/load_entropy/layer_{layer}": 1.5 + 0.1 * layer - 0.01 * step for layer in layers})
    entry.update({f"monitor/dead_experts/layer_{layer}": 0.125 * (step % 3) for layer in layers})
    return entry


def _recorded_plots(monkeypatch) -> list:
    """Every Axes.plot call (label, xs, ys), still drawn: what the PNGs show."""
    from matplotlib.axes import Axes

    calls, plot = [], Axes.plot

    def recording(self, *args, **kwargs):
        if len(args) >= 2:
            calls.append((kwargs.get("label"), [float(v) for v in args[0]], [float(v) for v in args[1]]))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording)
    return calls


@pytest.fixture()
def trained_run(tiny_model_dir, example_corpus, tmp_path):
    """A real `sara train` output (2 steps, no monitor) with a fake eval dir inside it."""
    from sara_moe.train import SaraConfig, train

    out = tmp_path / "sara-seed0"
    train(SaraConfig(output_dir=str(out), model_name_or_path=str(tiny_model_dir("qwen3_moe")), data=str(example_corpus),
                     lambda_js=0.0, report_to="none", max_steps=2, per_device_train_batch_size=4, save_strategy="no",
                     gradient_checkpointing=False, disable_tqdm=True, seed=0, logging_steps=1,
                     dataloader_num_workers=0))
    return out, _run(tmp_path, "sara-seed0", {"sw": 30, "en": 30})


def test_monitor_curves_draw_the_logged_values(trained_run, tmp_path, monkeypatch):
    out, sara_eval = trained_run
    sft_eval = _run(tmp_path, "sft-seed0", {"sw": 20, "en": 30})
    report = build_report([sft_eval, sara_eval], tmp_path / "plain")
    assert report["monitor"] == {}  # real trainer_state.json, no monitor keys: no curve, no error
    assert not list((tmp_path / "plain").glob("monitor_*.png"))
    assert "Training monitor" not in (tmp_path / "plain" / "report.md").read_text()

    state_file = out / "trainer_state.json"
    state = json.loads(state_file.read_text())
    passes = [_monitor_entry(0, {"sw": 0.30, "yo": 0.40}, 0.0), _monitor_entry(1, {"sw": 0.25, "yo": 0.38}, 0.02),
              _monitor_entry(2, {"sw": 0.20, "yo": 0.33}, 0.05)]
    state["log_history"] = state["log_history"][:1] + passes[:2] + state["log_history"][1:] + passes[2:]
    state_file.write_text(json.dumps(state))
    run_info = json.loads((out / "sara_run.json").read_text())
    run_info["monitor"] = {"probe": "split", "probe_group_ids": [f"g{i}" for i in range(12)], "languages": ["sw", "yo"],
                           "layers": [1, 2], "baseline": "step0", "monitor_steps": 1}
    (out / "sara_run.json").write_text(json.dumps(run_info))
    # the sft arm's training folder is the eval dir's parent; one pass with another language set
    (sft_eval.parent / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"loss": 3.0, "step": 5}, {"step": 5, "monitor/js/sw": 0.5, "monitor/english_drift": 0.1,
                                   "monitor/unknown_key": 9.0}]}))
    calls = _recorded_plots(monkeypatch)
    report = build_report([sft_eval, sara_eval], tmp_path / "curves")
    assert list(report["monitor"]) == ["sft", "sara"]
    [sara] = report["monitor"]["sara"]
    assert sara["trainer_state"] == str(state_file) and sara["monitor"]["baseline"] == "step0"
    series = sara["series"]
    assert series["js"]["sw"] == {"steps": [0, 1, 2], "values": [0.30, 0.25, 0.20]}
    assert series["english_drift"]["values"] == [0.0, 0.02, 0.05]
    assert series["js_layers"]["yo"][2]["values"] == pytest.approx([0.42, 0.40, 0.35])
    assert series["load_entropy"][1]["values"] == pytest.approx([1.6, 1.59, 1.58])
    assert series["dead_experts"][2]["values"] == [0.0, 0.125, 0.25] and series["seconds"]["steps"] == [0, 1, 2]
    sara_lines = [y for label, x, y in calls if label == "sara: sara-seed0"]
    assert sara_lines == [[0.30, 0.25, 0.20], [0.40, 0.38, 0.33], [0.0, 0.02, 0.05]]  # sw panel, yo panel, drift
    assert [y for label, x, y in calls if label == "sft: sft-seed0"] == [[0.5], [0.1]]
    layer_one = [(x, y) for label, x, y in calls if label == "layer 1"]  # load entropy, then dead experts
    assert [x for x, _ in layer_one] == [[0, 1, 2]] * 2
    assert np.allclose([y for _, y in layer_one], [[1.6, 1.59, 1.58], [0.0, 0.125, 0.25]])
    folder = tmp_path / "curves"
    assert {"monitor_js.png", "monitor_english_drift.png", "monitor_load.png"} <= {p.name for p in folder.iterdir()}
    text = (folder / "report.md").read_text()
    assert "## Training monitor" in text and "![monitor_js.png](monitor_js.png)" in text
    assert "- **sara** (sara-seed0): 3 monitor pass(es), steps 0–2; at step 2: sw JS 0.2000, yo JS 0.3300, " \
           "English drift 0.0500" in text
    assert "probe_group_ids: 12 entries" in text and "baseline: step0" in text
    broken = sft_eval.parent / "trainer_state.json"
    broken.write_text("{\"log_history\": [")
    with pytest.raises(Exception, match=r"trainer_state\.json:1: not valid JSON"):
        build_report([sft_eval], tmp_path / "broken")


def test_report_reads_a_real_monitor_run(tiny_model_dir, example_corpus, tmp_path):
    """`sara train` with the routing monitor (probe split off the corpus), then `sara report` on it."""
    from sara_moe.reporting.html_report import figure_data
    from sara_moe.train import SaraConfig, train

    out = tmp_path / "sara-seed0"
    train(SaraConfig(output_dir=str(out), model_name_or_path=str(tiny_model_dir("qwen3_moe")), data=str(example_corpus),
                     lambda_js=0.0, report_to="none", max_steps=4, per_device_train_batch_size=4, save_strategy="no",
                     gradient_checkpointing=False, disable_tqdm=True, seed=0, logging_steps=2, monitor_steps=2,
                     probe_data="split",
                     probe_groups=4, dataloader_num_workers=0))
    report = build_report([_run(tmp_path, "sara-seed0", {"sw": 30, "es": 25})], tmp_path / "report")
    logged = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
              if "monitor/english_drift" in h]
    assert len(logged) >= 2
    [entry] = report["monitor"]["sara"]
    series = entry["series"]
    assert sorted(series["js"]) == sorted(entry["monitor"]["languages"])
    for lang, s in series["js"].items():
        assert s == {"steps": [h["step"] for h in logged], "values": [h[f"monitor/js/{lang}"] for h in logged]}
    layer = entry["monitor"]["layers"][0]
    assert series["load_entropy"][layer]["values"] == [h[f"monitor/load_entropy/layer_{layer}"] for h in logged]
    page = figure_data((tmp_path / "report" / "report.html").read_text(encoding="utf-8"))
    assert [t["y"] for t in page["monitor-english-drift"]["data"]] == [[h["monitor/english_drift"] for h in logged]]
    assert {"monitor_js.png", "monitor_english_drift.png", "monitor_load.png"} <= set(report["plots"])


def _expert_analysis(seed: int) -> dict:
    """An analysis.json with expert counts [lang][layer][expert] (en, sw, yo; MoE layers 1-3; 4 experts)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, size=(3, 3, 4)).tolist()
    counts[2][0] = [0, 0, 0, 0]  # yo sent nothing through layer 1: shares 0, not a division by zero
    return {**_analysis({"sw": [0.3, 0.2, 0.1], "yo": [0.4, 0.3, 0.2]}), "langs": ["sw", "yo"], "anchor": "en",
            "recommended_layers": [2], "num_experts": 4,
            "all_pairs_js": {"langs": ["en", "sw", "yo"], "bands": {"early": [1], "middle": [2], "late": [3]},
                             "by_band": {band: np.eye(3).tolist() for band in ("early", "middle", "late")}},
            "experts": {"langs": ["en", "sw", "yo"], "counts": counts, "classes": [["shared"] * 4] * 3,
                        "specialisation": [0.1, 0.2, 0.3]}}


def test_report_html_embeds_the_analysis_numbers(tmp_path):
    from sara_moe.reporting.html_report import figure_data

    after, before = _expert_analysis(1), _expert_analysis(2)
    sara = _run(tmp_path, "sara-seed0", {"sw": 36, "en": 30}, after)
    (tmp_path / "sara-seed0" / "analysis_before").mkdir()
    (tmp_path / "sara-seed0" / "analysis_before" / "analysis.json").write_text(json.dumps(before))
    sft = _run(tmp_path, "sft-seed0", {"sw": 20, "en": 30})
    (tmp_path / "sara-seed0" / "trainer_state.json").write_text(json.dumps({"log_history": [
        _monitor_entry(2, {"sw": 0.3, "yo": 0.4}, 0.01), _monitor_entry(4, {"sw": 0.2, "yo": 0.35}, 0.03)]}))
    report = build_report([sft, sara], tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    from plotly.offline import get_plotlyjs

    assert get_plotlyjs() in page  # the runtime itself is inlined
    ours = page.replace(get_plotlyjs(), "")
    assert not re.search(r"<script[^>]*\bsrc=|<link|\bhref=|@import|https?://", ours)  # nothing else to fetch
    figures = figure_data(page)
    heatmaps = {key: fig for key, fig in figures.items() if key.startswith("heatmap-")}
    assert sorted(heatmaps) == sorted(f"heatmap-sara-{state}-{band}" for state in ("before", "after")
                                      for band in ("early", "middle", "late"))
    for state, analysis in (("before", before), ("after", after)):
        counts = np.asarray(analysis["experts"]["counts"], dtype=float)
        totals = counts.sum(-1, keepdims=True)
        shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        for band, index in (("early", 0), ("middle", 1), ("late", 2)):
            traces = heatmaps[f"heatmap-sara-{state}-{band}"]["data"]
            assert [t["meta"]["lang"] for t in traces] == ["en", "sw", "yo"]
            assert [t["visible"] for t in traces] == [False, True, False]  # the first non-anchor language
            for k, trace in enumerate(traces):
                assert trace["type"] == "heatmap" and trace["y"] == [f"layer {index + 1}"]
                assert np.allclose(trace["z"], [shares[k, index]]) and len(trace["z"]) == 1
    assert heatmaps["heatmap-sara-after-early"]["data"][2]["z"] == [[0.0, 0.0, 0.0, 0.0]]
    top = max(float(np.nanmax(np.asarray(a["experts"]["counts"]) / np.clip(
        np.asarray(a["experts"]["counts"]).sum(-1, keepdims=True), 1, None))) for a in (before, after))
    assert [t["zmax"] for f in heatmaps.values() for t in f["data"]] == pytest.approx([top] * 18)
    assert 'data-band="middle"' in page and "no analysis.json with expert counts for this arm" in page  # sft
    # the accuracy table: the paired test's numbers as report.json has them
    [comp] = [c for c in report["benchmarks"][0]["comparisons"] if c["lang"] == "sw"]
    assert comp["diff"] == pytest.approx(16 / N)
    cell = f"{100 * comp['diff']:+.1f} [{100 * comp['ci_low']:+.1f}, {100 * comp['ci_high']:+.1f}]"
    assert comp["p_mcnemar"] == pytest.approx(2 * 0.5 ** 16)  # 16 discordant items, all one way
    assert f"<td>{cell}</td><td>&lt;0.0001 *</td><td>&lt;0.0001</td>" in page
    assert "<td>+0.0 [+0.0, +0.0]</td><td>1</td><td>1</td>" in page  # en: identical arms
    assert "<td>50.0 ± 0.0 (runs=1, n=40)</td>" in page  # sft on sw: 20/40
    # routing JS per layer and the monitor curves
    routing = figures["routing-js"]["data"]
    assert routing[0]["y"] == pytest.approx([0.35, 0.25, 0.15]) and routing[1]["y"] == pytest.approx([0.35, 0.25, 0.15])
    js = {t["name"]: t for t in figures["monitor-js"]["data"]}
    assert js["sara: sara-seed0 · sw"]["x"] == [2, 4] and js["sara: sara-seed0 · sw"]["y"] == [0.3, 0.2]
    assert js["sara: sara-seed0 · yo"]["y"] == [0.4, 0.35] and js["sara: sara-seed0 · yo"]["visible"] is False
    assert figures["monitor-english-drift"]["data"][0]["y"] == [0.01, 0.03]
    dead = {t["name"]: t["y"] for t in figures["monitor-dead-experts"]["data"]}
    assert dead == {"sara: sara-seed0 · layer 1": [0.25, 0.125], "sara: sara-seed0 · layer 2": [0.25, 0.125]}
    assert '<option value="sw" selected>' in page and '<option value="middle">' in page
