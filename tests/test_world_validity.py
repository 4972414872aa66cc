"""Worlds that learn and validity first: the knowledge-gated pretraining schedule, and an invalid world
stopping `sara demo` (or, under `--full`, losing its arms) right after pretraining."""

from __future__ import annotations

import json

import pytest

from sara_moe.testbed.build import TestbedConfig, build
from sara_moe.testbed.pretrain import KnowledgeGate, dev_facts, pretrain

TINY = dict(num_persons=24, num_documents=1500, hidden_size=64, seq_len=48,
            clones=[{"name": "clone", "share": 0.2, "entities": "shared"}])
NEVER_VALID = {"en_knowledge_min": 1.0, "clone_en_only_max": -1.0}  # no accuracy is below 0: always invalid


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    build(TestbedConfig(seed=5, **TINY), out)
    return out


def test_gate_learning_rate_schedule():
    """Warm-up 10, cool-down 20, cap 100: linear ramp, constant, then linear decay to 0 from the cap's
    latest start (80) or from the step the facts were known."""
    gate = KnowledgeGate([], None, target=0.9, check_every=10, cooldown=20, max_steps=100, warmup=10)
    assert [gate.lr_factor(s) for s in (0, 5, 10, 79, 80, 90, 99, 100)] == [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.05, 0.0]
    gate.decay_from = 30
    assert [gate.lr_factor(s) for s in (29, 30, 40, 50, 60)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    gate.decay_from = 4  # known during warm-up: the lower of ramp and cool-down
    assert [gate.lr_factor(s) for s in (2, 4, 9, 14, 24)] == [0.2, 0.4, 0.75, 0.5, 0.0]
    with pytest.raises(ValueError, match="learn_until"):
        KnowledgeGate([], None, target=1.5, check_every=10, cooldown=20, max_steps=100, warmup=10)
    with pytest.raises(ValueError, match="max_steps"):
        KnowledgeGate([], None, target=0.9, check_every=10, cooldown=95, max_steps=100, warmup=10)


def test_dev_facts_are_english_dev_items_only(testbed):
    facts = dev_facts(testbed)
    rows = [json.loads(line) for split in ("shared", "en_only")
            for line in (testbed / f"eval_mc_{split}.jsonl").read_text().splitlines()]
    expected = {f"en|{r['id']}" for r in rows if r["lang"] == "en" and r["part"] == "dev"}
    assert {f["key"] for f in facts} == expected and len(expected) > 0
    info = json.loads((testbed / "testbed.json").read_text())
    assert not {f["key"].split("|")[1].split(":", 1)[1] for f in facts} & set(info["fact_part"]["test"])
    fact = facts[0]  # a choice is the bare fact sentence, as pretraining writes it
    assert all(not c.startswith("answer") and c.endswith(" .") for c in fact["choices"])


def test_pretraining_stops_a_cooldown_after_the_facts_are_known(testbed, tmp_path):
    """Target 0.01 is met at the first check (step 10), so it decays over 15 steps and stops at 25; the
    final knowledge equals the experiment's own scorer (`arms.knowledge_scores`) on the saved model."""
    from sara_moe.experiment.arms import knowledge_scores
    from sara_moe.experiment.run import world_items

    cfg = TestbedConfig(seed=5, **TINY, max_steps=200, learn_until=0.01, check_every=10, cooldown_steps=15)
    log = pretrain(testbed, tmp_path / "base", cfg, progress=False)
    assert log["schedule"] == "learn_until" and log["steps"] == 25 and log["cooldown_from"] == 10
    assert [c["step"] for c in log["knowledge_checks"]] == [10] and log["reached_target"]
    saved = json.loads((tmp_path / "base" / "pretrain_log.json").read_text())
    assert saved["steps"] == 25
    items = [r for r in world_items(testbed) if r["part"] == "dev"]
    scores = knowledge_scores(tmp_path / "base", items)
    for split in ("shared", "en_only"):
        keys = [r["key"] for r in items if r["lang"] == "en" and r["split"] == split]
        assert log["final_knowledge"][split] == pytest.approx(sum(scores[k] for k in keys) / len(keys), abs=1e-4)
    # logged every 10 steps, the rate step s trained with (factor of step s - 1); warm-up min(50, 200 // 10)
    # = 20 steps: 3e-3 x 9/20 at step 10; at step 20 the cool-down begun at 10 is lower than the ramp
    # (19/20): 3e-3 x (10 + 15 - 19) / 15
    assert [step for step, _ in saved["learning_rates"]] == [10, 20]
    assert [lr for _, lr in saved["learning_rates"]] == pytest.approx([1.35e-3, 1.2e-3], rel=1e-9)


def test_pretraining_cap_when_the_facts_are_never_known(testbed, tmp_path):
    """Target 1.0 is out of reach in 40 steps: checks at 10 and 20 (not after the cap's cool-down starts
    at 25), then the decay runs to the cap."""
    cfg = TestbedConfig(seed=5, **TINY, max_steps=40, learn_until=1.0, check_every=10, cooldown_steps=15)
    log = pretrain(testbed, tmp_path / "base", cfg, progress=False)
    assert log["steps"] == 40 and log["cooldown_from"] is None and not log["reached_target"]
    assert [c["step"] for c in log["knowledge_checks"]] == [10, 20]
    assert all(0.0 <= c["shared"] <= 1.0 and 0.0 <= c["en_only"] <= 1.0 for c in log["knowledge_checks"])


def test_fixed_schedule_is_unchanged_without_the_gate(testbed, tmp_path):
    log = pretrain(testbed, tmp_path / "base", TestbedConfig(seed=5, **TINY, max_steps=20), progress=False)
    assert log["schedule"] == "cosine" and log["steps"] == 20 and "knowledge_checks" not in log


def test_invalid_world_stops_the_demo_before_priors_and_arms(tmp_path, monkeypatch, capsys):
    """`sara demo` on a world that fails validity exits 1 with one line naming what failed, by how much,
    and a seed to try; nothing after the base model's check ran (no priors, no analysis, no arm)."""
    from sara_moe.cli import main
    from sara_moe.experiment import run

    monkeypatch.setattr(run, "VALIDITY", NEVER_VALID)
    out = tmp_path / "demo"
    assert main(["demo", "--size", "ci", "--ft_seeds", "1", "--jobs", "1", "--output_dir", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # progress bars above it; the refusal is one line
    refusals = [line for line in lines if "sara demo:" in line]
    assert len(refusals) == 1 and lines[-1].endswith(refusals[0]), lines[-3:]
    err = refusals[0]
    assert "routed_topic world seed 0 is invalid" in err and "--seed 1" in err
    assert "of English dev facts as pretraining sentences, < 100" in err and "> -100" in err
    world = next((out / "worlds").iterdir())
    assert (world / "base" / "pretrain_log.json").is_file()
    assert not (world / "priors.safetensors").exists() and not (world / "analysis").exists()
    assert [p.name for p in (out / "runs").glob("*/*")] == ["base"]
    assert not (out / "summary.json").exists()


def test_full_skips_an_invalid_worlds_arms_and_says_so(tmp_path):
    from dataclasses import replace

    from sara_moe.experiment.demo import CI_RECIPE, CI_WORLD
    from sara_moe.experiment.run import ExperimentConfig, Recipe, run_experiment

    cfg = ExperimentConfig(output_dir=str(tmp_path / "exp"), worlds=["routed_topic"], world_seeds=[0],
                           arms=["base", "sft", "sara"], ft_seeds=[0], world_overrides=dict(CI_WORLD),
                           recipe=replace(Recipe(), **CI_RECIPE), validity=NEVER_VALID)
    summary = run_experiment(cfg)
    world = summary["worlds"][0]
    assert not world["valid"] and world["arms_run"] is False
    assert world["reasons"][-1] == "its arms were not run: the validity check comes right after pretraining"
    assert {r["arm"] for r in summary["runs"]} == {"base"} and summary["comparisons"] == []
    assert [p.name for p in (tmp_path / "exp" / "runs").glob("*/*")] == ["base"]
    report = (tmp_path / "exp" / "report.md").read_text()
    assert "World seed 0 is left out" in report and "its arms were not run" in report


def test_sweep_record_as_markdown():
    """The docs table is generated from the sweep record: counts, the short reasons and step ranges."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "world_validity.py"
    spec = importlib.util.spec_from_file_location("world_validity_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def world(kind, seed, steps, known, clone, reasons):
        return {"world": kind, "world_seed": seed, "pretrain_steps": steps, "en_shared_known_dev": known[0],
                "en_en_only_known_dev": known[1], "clone_en_only_dev": clone, "valid": not reasons, "reasons": reasons}

    ceiling = "base clone English-only dev accuracy 97.9 > 95: no room for a transfer gain"
    unlearned = "base model knows 50.0% (shared) of English dev facts as pretraining sentences, < 90%: it did not learn English"
    record = {"worlds": [world("plain", 1, 800, (1.0, 1.0), 0.75, []),
                         world("plain", 2, 1200, (1.0, 1.0), 0.979, [ceiling]),
                         world("routed_lang", 1, 900, (0.5, 0.875), 0.1, [unlearned])]}
    text = script.markdown(record)
    assert "| `plain` | 1 | 2 | 2 of 2 | 2 (clone ceiling 97.9%) | 800-1200 |" in text
    assert "| `routed_lang` | 0 | 1 | 0 of 1 | 1 (English facts known 50.0 / 87.5%) | 900-900 |" in text
    assert "- `plain`: 1: 800, 100.0/100.0, 75.0; 2: 1200, 100.0/100.0, 97.9 x" in text
    assert "routed_topic" not in text
