"""sara report: hand-computed numbers on fixture results, paired tests on constructed cases, bad input."""

from __future__ import annotations

import json
import math
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
