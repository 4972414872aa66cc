"""A reduced `sara demo` runs end to end and its summary.json and report.md say what its run files hold."""

from __future__ import annotations

import json

import pytest

from sara_moe.cli import main
from sara_moe.experiment.demo import run_demo
from sara_moe.experiment.report import pts

OPEN = {"en_knowledge_min": 0.0, "clone_en_only_max": 1.0}  # CI-size worlds are too small to be valid


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = run_demo(out, seed=0, size="ci", ft_seeds=1, validity=OPEN)
    return out, summary


def test_summary_schema(demo):
    out, summary = demo
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["runs"] == summary["runs"]
    assert {"runs", "comparisons", "selected", "seconds"} <= set(on_disk)
    arms = {r["arm"] for r in on_disk["runs"]}
    assert arms == {"base", "sft", "sara", "sara_shuffled"}  # the single-world preset
    for row in on_disk["runs"]:
        assert {"world", "world_seed", "arm", "ft_seed", "split", "lang", "acc"} <= set(row)
        assert row["split"] in ("shared", "en_only") and 0.0 <= row["acc"] <= 1.0
    comps = on_disk["comparisons"]
    assert {(c["arm"], c["baseline"]) for c in comps} >= {("sara", "sft"), ("sara", "sara_shuffled")}
    for c in comps:
        assert {"world", "split", "lang", "arm", "baseline", "diff_mean", "p_value", "n_world_seeds", "n_positive"} <= set(c)
        assert -1.0 <= c["diff_mean"] <= 1.0 and 0.0 <= c["p_value"] <= 1.0 and c["n_world_seeds"] == 1
    assert on_disk["selected"]["recipe"]["max_steps"] == 10 and "source" in on_disk["selected"]
    assert json.loads((out / "demo_config.json").read_text())["size"] == "ci"
    # the base model's knowledge (English facts as pretraining sentences) is measured for validity,
    # per split, from the cached per-item scores beside the base run
    world = on_disk["worlds"][0]
    assert 0.0 <= world["en_shared_known_dev"] <= 1.0 and 0.0 <= world["en_en_only_known_dev"] <= 1.0
    known = json.loads(next(out.glob("runs/*/base/knowledge.json")).read_text())
    assert known and all(key.startswith("en|") and value in (0, 1) for key, value in known.items())


def test_numbers_recomputed_from_run_files(demo):
    """Every test accuracy in summary.json equals the mean of its run's per-item scores on disk."""
    out, summary = demo
    meta = {}
    testbed = next((out / "worlds").iterdir()) / "testbed"
    for split in ("shared", "en_only"):
        for line in (testbed / f"eval_mc_{split}.jsonl").read_text().splitlines():
            item = json.loads(line)
            meta[f"{item['lang']}|{item['id']}"] = (item["lang"], item["split"], item["part"])
    results = [json.loads(p.read_text()) for p in (out / "runs").rglob("result.json")]
    assert len(results) == 1 + 3  # base + three trained arms x one FT seed
    for row in summary["runs"]:
        record = next(r for r in results if r["arm"] == row["arm"] and r["ft_seed"] == row["ft_seed"])
        keys = [k for k, m in meta.items() if m == (row["lang"], row["split"], "test")]
        assert row["acc"] == pytest.approx(sum(record["scores"][k] for k in keys) / len(keys))
    sara = next(c for c in summary["comparisons"] if (c["arm"], c["baseline"], c["split"], c["lang"])
                == ("sara", "sft", "en_only", "clone"))
    acc = {r["arm"]: r["acc"] for r in summary["runs"] if (r["split"], r["lang"]) == ("en_only", "clone")}
    assert sara["diff_mean"] == pytest.approx(acc["sara"] - acc["sft"])
    report = (out / "report.md").read_text()
    assert f"({pts(sara['diff_mean'])} points" in report  # the report quotes the computed difference
    assert (out / "accuracy_routed_topic.png").stat().st_size > 1000


def test_two_jobs_give_the_same_numbers(demo, tmp_path):
    """With a worker pool (the CLI's default `--jobs 2`: the one world pretrained in the main process
    while the workers warm up, then base, priors and arms spread over the workers) every number equals
    the one-process run's."""
    from safetensors.torch import load_file

    out, summary = demo
    pooled = run_demo(tmp_path, seed=0, size="ci", ft_seeds=1, validity=OPEN, jobs=2)
    for key in ("runs", "dev_runs", "routing", "comparisons", "worlds"):
        rows = [{k: v for k, v in row.items() if k != "folder"} for row in pooled[key]]
        assert rows == [{k: v for k, v in row.items() if k != "folder"} for row in summary[key]], key
    base = [load_file(next(root.glob("worlds/*/base/model.safetensors"))) for root in (out, tmp_path)]
    assert base[0].keys() == base[1].keys() and all(base[0][k].equal(base[1][k]) for k in base[0])


def test_presets():
    """The single-world demo is sized for minutes (4 arms x 2 FT seeds); --full adds the controls and a
    third FT seed; options given replace the preset's."""
    from sara_moe.experiment.demo import preset

    assert preset(False, seed=7) == {"worlds": ["routed_topic"], "world_seeds": [7],
                                     "arms": ["base", "sft", "sara", "sara_shuffled"], "ft_seeds": [0, 1]}
    full = preset(True)
    assert full["worlds"] == ["plain", "routed_lang", "routed_topic"] and full["world_seeds"] == [0, 1, 2, 3, 4]
    assert full["arms"] == ["base", "sft", "sara", "sara_shuffled", "sara_mean", "sara_topic_shuffled"]
    assert full["ft_seeds"] == [0, 1, 2]
    assert preset(False, arms=["base", "sft"], ft_seeds=3, world_seeds=[5]) == {
        "worlds": ["routed_topic"], "world_seeds": [5], "arms": ["base", "sft"], "ft_seeds": [0, 1, 2]}
    with pytest.raises(ValueError, match="--ft-seeds 0"):
        preset(False, ft_seeds=0)


def test_rerun_reuses_world_and_runs(demo, capsys, monkeypatch):
    from sara_moe.experiment import run

    out, summary = demo
    monkeypatch.setattr(run, "VALIDITY", OPEN)  # the CLI has no validity flag; a CI world fails the real rule
    assert main(["demo", "--size", "ci", "--ft-seeds", "1", "--jobs", "1", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cached in" in printed and "report written to" in printed
    again = json.loads((out / "summary.json").read_text())
    assert again["runs"] == summary["runs"]  # same seed, same numbers (cached runs, deterministic)
    # the first run trained everything; the rerun read every run back and its report says so
    assert summary["runs_read_back"] == {"cached": 0, "total": again["runs_read_back"]["total"]}
    assert again["runs_read_back"]["cached"] == again["runs_read_back"]["total"] > 1
    assert "runs were read back from the run cache" in (out / "report.md").read_text()


def test_kl_and_steer_arms(tmp_path):
    """The related-method arms: `kl` trains with KL(anchor || target) on the own prior; `steer` is the SFT
    model (same recipe and seed, so the same weights) with only the clone's items steered, at the grid
    point that is best on the clone's dev items."""
    from dataclasses import replace

    from sara_moe.experiment.arms import STEER_GRID
    from sara_moe.experiment.demo import CI_RECIPE, CI_WORLD
    from sara_moe.experiment.run import ExperimentConfig, Recipe, run_experiment

    cfg = ExperimentConfig(output_dir=str(tmp_path), worlds=["routed_topic"], world_seeds=[0],
                           arms=["base", "sft", "kl", "steer"], ft_seeds=[0], world_overrides=dict(CI_WORLD),
                           recipe=replace(Recipe(), **CI_RECIPE), validity=OPEN)
    summary = run_experiment(cfg)
    records = {r["arm"]: r for r in map(lambda p: json.loads(p.read_text()), (tmp_path / "runs").rglob("result.json"))}
    kl_config = json.loads(next((tmp_path / "runs").rglob("kl-ft0-*/model/sara_config.json")).read_text())
    sft_config = json.loads(next((tmp_path / "runs").rglob("sft-ft0-*/model/sara_config.json")).read_text())
    assert kl_config["divergence"] == "kl" and kl_config["lambda_js"] == cfg.recipe.lambda_js
    assert sft_config["divergence"] == "js" and sft_config["lambda_js"] == 0.0
    steer, sft = records["steer"], records["sft"]
    english = [k for k in sft["scores"] if k.startswith("en|")]
    clone = [k for k in sft["scores"] if k.startswith("clone|")]
    assert english and clone and all(steer["scores"][k] == sft["scores"][k] for k in english)
    choice = steer["steer"]
    assert (choice["top_k"], choice["strength"]) in STEER_GRID and len(choice["dev_accuracy"]) == len(STEER_GRID)
    best = max(t["acc"] for t in choice["dev_accuracy"])
    chosen = next(t for t in choice["dev_accuracy"] if (t["top_k"], t["strength"]) == (choice["top_k"], choice["strength"]))
    assert chosen["acc"] == best
    assert steer["routing_js"] is None and {r["arm"] for r in summary["routing"]} == {"base", "sft", "kl"}
    assert {("kl", "sft"), ("steer", "sft")} <= {(c["arm"], c["baseline"]) for c in summary["comparisons"]}
