"""The study's language-neuron view: every run's record carries counts equal to a recount with `sara neurons`
on the kept model, the base compared with itself keeps all its clone-specific neurons, cached runs keep or
honestly miss their counts, and report.md states the numbers summary.json holds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from sara_moe.analysis.neurons import NeuronsConfig, neurons
from sara_moe.evaluation.paired_tests import paired_bootstrap
from sara_moe.experiment.demo import CI_RECIPE, CI_WORLD
from sara_moe.experiment.run import ExperimentConfig, Recipe, run_experiment

OPEN = {"en_knowledge_min": 0.0, "clone_en_only_max": 1.0}  # CI-size worlds are too small to be valid
METHODS = ("lnp", "lape")
# a CI world's neurons are saturated: over 5% of its activation probabilities are exactly 1, so the papers' 0.95
# quantile bars (strict >) assign no language at all; lower bars make both methods find language neurons
THRESHOLDS = {"lape_filter_rate": 0.8, "lape_activation_bar_ratio": 0.8, "lnp_activation_bar_ratio": 0.8,
              "lape_top_rate": 0.05, "lnp_top_rate": 0.05}


def _config(out) -> ExperimentConfig:
    return ExperimentConfig(output_dir=str(out), worlds=["routed_lang"], world_seeds=[0], arms=["base", "sft", "sara"],
                            ft_seeds=[0, 1], world_overrides=dict(CI_WORLD), recipe=replace(Recipe(), **CI_RECIPE),
                            validity=OPEN, keep_models=True, neurons=True, neuron_thresholds=THRESHOLDS)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("neuron_view")
    summary = run_experiment(_config(out))
    world = next((out / "worlds").iterdir())
    runs = {}
    for result in (out / "runs").rglob("result.json"):
        record = json.loads(result.read_text())
        model = world / "base" if record["arm"] == "base" else result.parent / "model"
        recount = neurons(NeuronsConfig(output_dir=str(tmp_path_factory.mktemp("recount")), model=str(model),
                                        data=str(world / "testbed" / "probe.jsonl"), langs=["en", "clone"],
                                        device="cpu", **THRESHOLDS))
        runs[(record["arm"], record["ft_seed"])] = (result, record, recount)
    return out, summary, runs


def _specific(recount: dict, method: str, lang: str) -> set:
    return {(layer, expert, neuron) for layer, kind, expert, neuron in
            recount["classification"][method]["neurons"][lang]["specific"] if kind == "routed"}


def _band(values, layers, band) -> float:
    return sum(v for v, layer in zip(values, layers) if layer in band)


def test_records_equal_a_recount_on_the_kept_model(study):
    _, summary, runs = study
    assert set(runs) == {("base", 0), ("sft", 0), ("sft", 1), ("sara", 0), ("sara", 1)}
    base_recount = runs[("base", 0)][2]
    for (arm, ft_seed), (_, record, recount) in runs.items():
        found = record["neurons"]
        layers = recount["moe_layers"]
        assert found["moe_layers"] == layers and found["langs"] == ["en", "clone"] and found["seconds"] > 0
        assert found["tokens"] == recount["tokens"]
        for method in METHODS:
            per_layer = found["methods"][method]["per_layer"]
            counts = recount["classification"][method]["counts"]["routed"]["specific"]  # [layer][expert][lang]
            langs = recount["langs"]
            for name, lang in (("clone_specific", "clone"), ("en_specific", "en")):
                by_layer = [sum(expert[langs.index(lang)] for expert in counts[i]) for i in range(len(layers))]
                assert per_layer[name] == by_layer, (arm, method, name)
            clone, english = _specific(recount, method, "clone"), _specific(recount, method, "en")
            assert {tuple(c) for c in found["methods"][method]["clone_specific"]} == clone
            assert {tuple(c) for c in found["methods"][method]["en_specific"]} == english
            before, base_en = _specific(base_recount, method, "clone"), _specific(base_recount, method, "en")
            vs = found["vs_base"][method]
            assert vs["kept"] == [len({c for c in before & clone if c[0] == x}) for x in layers]
            assert vs["new"] == [len({c for c in clone - before if c[0] == x}) for x in layers]
            assert vs["kept_share"] == (len(before & clone) / len(before) if before else None)
            union = clone | base_en
            assert vs["en_overlap"] == (len(clone & base_en) / len(union) if union else None)
        row = next(r for r in summary["neuron_runs"] if (r["arm"], r["ft_seed"]) == (arm, ft_seed))
        assert row["per_layer"] == {m: found["methods"][m]["per_layer"] for m in METHODS} and "methods" not in row


def test_the_base_keeps_all_its_own_clone_specific_neurons(study):
    _, _, runs = study
    found = runs[("base", 0)][1]["neurons"]
    counted = [m for m in METHODS if found["methods"][m]["clone_specific"]]
    assert counted == list(METHODS)  # both methods find clone-specific neurons in the base model
    for method in counted:
        vs = found["vs_base"][method]
        assert vs["kept_share"] == 1.0 and sum(vs["new"]) == 0 and vs["en_overlap"] == 0.0


def test_report_states_the_numbers_of_summary_json(study):
    out, summary, runs = study
    on_disk = json.loads((out / "summary.json").read_text())
    block = on_disk["neurons"]
    assert block == json.loads(json.dumps(summary["neurons"])) and block["counted"] == 5 and not block["missing"]
    entry = block["worlds"]["routed_lang"]
    aligned = entry["bands"]["aligned"]
    assert aligned == [1, 2] and entry["bands"]["outside"] == [x for x in entry["layers"] if x not in (1, 2)]
    report = (out / "report.md").read_text()
    assert "## Language neurons" in report
    method = "lape"
    kept = {}
    for arm in ("sft", "sara"):  # kept share in layers 1-2, recomputed from the result files
        for ft_seed in (0, 1):
            vs = runs[(arm, ft_seed)][1]["neurons"]["vs_base"][method]
            base_count = _band(vs["base_clone_specific"], entry["layers"], aligned)
            kept[(arm, ft_seed)] = _band(vs["kept"], entry["layers"], aligned) / base_count if base_count else None
    pair = entry["sara_vs_sft"][method]["aligned"]["kept_share"]
    if None in kept.values():
        assert pair["n_pairs"] < 2
        return
    test = paired_bootstrap([kept[("sft", s)] for s in (0, 1)], [kept[("sara", s)] for s in (0, 1)])
    assert pair["n_pairs"] == 2 and pair["diff"] == pytest.approx(test["diff"]) and pair["p"] == test["p"]
    assert pair["sara"] == pytest.approx((kept[("sara", 0)] + kept[("sara", 1)]) / 2)
    p = "p < 0.001" if test["p"] < 0.001 else f"p = {test['p']:.3f}"
    assert (f"LAPE, layers 1, 2: SARA kept {100 * pair['sara']:.1f}% of the base model's clone-specific neurons, "
            f"SFT {100 * pair['sft']:.1f}%") in report
    assert f"{p} over 2 (world seed, FT seed) pairs" in report
    mean = entry["arms"]["sft"][method]["aligned"]["clone_specific"]["mean"]
    assert mean == pytest.approx(sum(_band(runs[("sft", s)][1]["neurons"]["methods"][method]["per_layer"]
                                           ["clone_specific"], entry["layers"], aligned) for s in (0, 1)) / 2)
    assert f"| LAPE | sft | 1, 2 | {mean:.1f} [" in report


def test_cached_runs_keep_count_or_are_missing(study):
    """A rerun reads every count back; a run cached without one is counted if its weights are there, else missing."""
    out, summary, runs = study
    with_weights, without = runs[("sft", 0)][0], runs[("sara", 1)][0]
    for result in (with_weights, without):
        record = json.loads(result.read_text())
        record.pop("neurons")
        result.write_text(json.dumps(record))
    for weights in (without.parent / "model").glob("*.safetensors"):
        weights.unlink()
    again = run_experiment(_config(out))
    assert again["runs_read_back"]["cached"] == again["runs_read_back"]["total"] == 5
    rows = {(r["arm"], r["ft_seed"]): r for r in again["neuron_runs"]}
    assert "missing" in rows[("sara", 1)] and "weights are deleted" in rows[("sara", 1)]["missing"]
    assert again["neurons"]["missing"] == [{"world": "routed_lang", "world_seed": 0, "arm": "sara", "ft_seed": 1,
                                            "missing": rows[("sara", 1)]["missing"]}]
    assert "neurons" not in json.loads(without.read_text())  # nothing invented on disk
    recounted = json.loads(with_weights.read_text())["neurons"]  # counted again and written back
    assert recounted["methods"] == runs[("sft", 0)][1]["neurons"]["methods"]
    before = {(r["arm"], r["ft_seed"]): r for r in summary["neuron_runs"]}
    for key in (("base", 0), ("sft", 0), ("sft", 1), ("sara", 0)):
        assert {k: v for k, v in rows[key].items() if k != "seconds"} == \
            {k: v for k, v in before[key].items() if k != "seconds"}
    report = (out / "report.md").read_text()
    assert "- Missing: routed_lang seed 0 sara ft1:" in report
    pair = again["neurons"]["worlds"]["routed_lang"]["sara_vs_sft"]["lape"]["aligned"]["kept_share"]
    assert pair["n_pairs"] == 1 and pair["p"] is None  # one pair left: no test, and the report says so
    assert "on a single (world seed, FT seed) pair: no test" in report
