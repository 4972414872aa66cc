"""The testbed's routing knob, the experiment's controls, dev/test separation and a report that follows its numbers."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from sara_moe import divergence as D
from sara_moe.experiment.arms import control_table, derangement
from sara_moe.experiment.report import (
    arm_accuracy,
    comparison_sentence,
    comparisons,
    draw_world,
    pts,
    render_search,
    summary_sentences,
)
from sara_moe.experiment.run import world_config
from sara_moe.experiment.select import choose_lambda, choose_regime, choose_search, search
from sara_moe.testbed.build import TestbedConfig, build, instruct_topic
from sara_moe.testbed.pretrain import pretrain
from sara_moe.testbed.world import Clone, World

SMALL = dict(num_persons=24, num_documents=1500, hidden_size=64, seq_len=48, max_steps=80, learn_until=0)  # the fixed schedule: short


# ----------------------------------------------------------------------------- the knob


def test_topic_labels_change_no_text():
    """Labelled translation equals plain translation, word for word, for every clone variant."""
    world = World(7, 10, [Clone("a"), Clone("b", entities="separate"), Clone("c", swap=True, split=True)])
    rng = random.Random(1)
    for person in range(10):
        sentences = world.bio_sentences(person, ["city", "food", "job", "colour"], rng)
        flat = [w for _, s in sentences for w in s]
        for lang in ("en", "a", "b", "c"):
            words, labels = world.translate_labeled(sentences, lang)
            assert words == world.translate(flat, lang)
            assert len(labels) == len(words) and set(labels) <= {"city", "food", "job", "colour"}
        words, labels = world.translate_labeled(sentences, "en")
        start = 0
        for topic, sentence in sentences:  # English labels are exactly the sentence topics in order
            assert labels[start:start + len(sentence)] == [topic] * len(sentence)
            start += len(sentence)


def test_knob_fields_do_not_change_the_world(tmp_path):
    """Same seed -> same bytes whatever the routing knob says; topic labels align with the words."""
    plain = TestbedConfig(seed=4, num_persons=16, num_documents=300)
    routed = TestbedConfig(seed=4, num_persons=16, num_documents=300, route_weight=0.5, route_by="lang_topic")
    build(plain, tmp_path / "a")
    build(routed, tmp_path / "b")
    for name in ("pretrain.jsonl", "pretrain_topics.jsonl", "instruct.jsonl", "probe.jsonl", "eval_mc_shared.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    docs = (tmp_path / "a" / "pretrain.jsonl").read_text().splitlines()
    topics = (tmp_path / "a" / "pretrain_topics.jsonl").read_text().splitlines()
    assert len(docs) == len(topics)
    for doc, top in zip(docs, topics):
        words, codes = json.loads(doc)["text"].split(), json.loads(top)["topics"]
        assert len(words) == len(codes)
        if " plus " not in json.loads(doc)["text"] and json.loads(doc)["lang"] == "en":
            for word, code in zip(words, codes):  # an English value word carries its own attribute's code
                if word[0] in "cfjk" and word[1:].isdigit():
                    assert code == word[0]


def test_dev_and_test_share_no_fact(tmp_path):
    build(TestbedConfig(seed=2, num_persons=24, num_documents=200), tmp_path)
    info = json.loads((tmp_path / "testbed.json").read_text())
    dev, test = set(info["fact_part"]["dev"]), set(info["fact_part"]["test"])
    assert dev and test and not dev & test
    for split in ("shared", "en_only"):
        rows = [json.loads(x) for x in (tmp_path / f"eval_mc_{split}.jsonl").read_text().splitlines()]
        for row in rows:
            fact = row["id"].split(":", 1)[1]
            assert fact in (dev if row["part"] == "dev" else test)
        parts = {row["part"] for row in rows}
        assert parts == {"dev", "test"}


@pytest.fixture(scope="module")
def routed_worlds(tmp_path_factory):
    """Short pretrains of a language-routed and a topic-routed world, with priors and probe analysis."""
    from sara_moe.analysis.analyze import analyze
    from sara_moe.priors import extract_priors, load_priors

    out = {}
    for kind in ("routed_lang", "routed_topic"):
        folder = tmp_path_factory.mktemp(kind)
        cfg = world_config(kind, 0, SMALL)
        build(cfg, folder / "tb")
        log = pretrain(folder / "tb", folder / "base", cfg, progress=False)
        extract_priors(str(folder / "base"), str(folder / "tb" / "instruct.jsonl"), folder / "p.safetensors",
                       device="cpu", progress=False)
        probe = analyze(str(folder / "base"), str(folder / "tb" / "probe.jsonl"), str(folder / "an"),
                        langs=["clone", "en_other"], device="cpu")
        out[kind] = {"log": log, "priors": load_priors(folder / "p.safetensors"), "probe": probe}
    return out


def test_language_knob_separates_routing(routed_worlds):
    world = routed_worlds["routed_lang"]
    js = world["probe"]["metrics"]["js_pair_mean"]
    layers = world["probe"]["moe_layers"]
    for layer in (1, 2):
        i = layers.index(layer)
        assert js["clone"][i] >= 5 * js["en_other"][i], (layer, js)
    assert world["log"]["route_losses"][-1] < world["log"]["route_losses"][0]


def _prior_spread(cache) -> float:
    """Mean JS of each example's prior to the mean prior, at layers 1-2."""
    table = cache.table[:, [cache.layers.index(1), cache.layers.index(2)], :]
    return float(D.js_divergence(table, table.mean(0, keepdim=True)).mean())


def test_topic_knob_makes_priors_differ_more(routed_worlds):
    assert _prior_spread(routed_worlds["routed_topic"]["priors"]) > 2 * _prior_spread(routed_worlds["routed_lang"]["priors"])


def test_weight_zero_is_bit_identical_to_no_knob(tmp_path):
    base = dict(seed=1, num_persons=16, num_documents=300, hidden_size=32, max_steps=6, seq_len=32)
    build(TestbedConfig(**base), tmp_path / "tb")
    a = pretrain(tmp_path / "tb", tmp_path / "a", TestbedConfig(**base), progress=False)
    b = pretrain(tmp_path / "tb", tmp_path / "b", TestbedConfig(**base, route_weight=0.0, route_by="lang_topic",
                                                                  route_layers=[0, 3]), progress=False)
    assert a["losses"] == b["losses"] and b["route_losses"] == []
    c = pretrain(tmp_path / "tb", tmp_path / "c", TestbedConfig(**base, route_weight=0.5), progress=False)
    assert c["route_losses"] and c["losses"] != a["losses"]


def test_knob_refuses_uneven_groups(tmp_path):
    cfg = TestbedConfig(seed=1, num_persons=16, num_documents=100, num_experts=8, route_weight=0.5,
                        route_by="lang_topic", max_steps=2, hidden_size=32,
                        clones=[{"name": "x", "share": 0.2}, {"name": "y", "share": 0.2}])
    build(cfg, tmp_path / "tb")
    with pytest.raises(ValueError, match="num_experts: 8 experts cannot be split evenly into 12 groups"):
        pretrain(tmp_path / "tb", tmp_path / "m", cfg, progress=False)


# ----------------------------------------------------------------------------- control priors


def test_control_priors():
    ids = [f"ft-shared-p{i}-{t}" for i in range(6) for t in ("city", "food", "job")]
    table = torch.rand(len(ids), 2, 4)
    table = table / table.sum(-1, keepdim=True)
    shuffled = control_table(table, ids, "shuffled", seed=0)
    rows = [next(j for j in range(len(ids)) if torch.equal(shuffled[i], table[j])) for i in range(len(ids))]
    assert sorted(rows) == list(range(len(ids))) and all(i != r for i, r in enumerate(rows))  # derangement
    topic = control_table(table, ids, "topic_shuffled", seed=0)
    rows = [next(j for j in range(len(ids)) if torch.equal(topic[i], table[j])) for i in range(len(ids))]
    assert all(i != r and instruct_topic(ids[i]) == instruct_topic(ids[r]) for i, r in enumerate(rows))
    mean = control_table(table, ids, "mean", seed=0)
    assert torch.allclose(mean, table.mean(0, keepdim=True).expand_as(table))
    assert torch.equal(control_table(table, ids, "own", 0), table)
    assert not torch.equal(control_table(table, ids, "shuffled", 1), shuffled)  # the FT seed picks the shuffle
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, random.Random(0))


# ----------------------------------------------------------------------------- selection reads dev only


def _summary(dev: dict, test: dict) -> dict:
    """dev/test: {(arm, split, lang): acc} for one valid world seed."""
    def rows(values):
        return [{"world": "w", "world_seed": 0, "arm": a, "ft_seed": 0, "split": s, "lang": lang, "acc": v}
                for (a, s, lang), v in values.items()]
    return {"worlds": [{"world": "w", "world_seed": 0, "valid": True}], "dev_runs": rows(dev), "runs": rows(test)}


def _accs(base_en, sft_en, sft_clone, sara_clone=None, sara_shared=None):
    out = {("base", "shared", "en"): base_en, ("sft", "shared", "en"): sft_en, ("sft", "en_only", "clone"): sft_clone,
           ("sft", "shared", "clone"): 0.8}
    if sara_clone is not None:
        out.update({("sara", "en_only", "clone"): sara_clone, ("sara", "shared", "en"): sara_shared,
                    ("sara", "shared", "clone"): 0.8})
    return out


def test_selection_reads_dev_only():
    cands = [({"learning_rate": 1e-4, "max_steps": 60}, _accs(0.95, 0.94, 0.50)),
             ({"learning_rate": 3e-4, "max_steps": 60}, _accs(0.95, 0.80, 0.70)),   # damages English: excluded
             ({"learning_rate": 1e-4, "max_steps": 120}, _accs(0.95, 0.95, 0.60))]
    test_a = [(r, _summary(d, {k: 0.1 for k in d})) for r, d in cands]
    test_b = [(r, _summary(d, {k: 0.9 for k in d})) for r, d in cands]
    assert choose_regime(test_a)["choice"] == choose_regime(test_b)["choice"] == {"learning_rate": 1e-4, "max_steps": 120}
    # the dev numbers do decide: make the 60-step regime better on dev and it wins
    cands[0] = (cands[0][0], _accs(0.95, 0.94, 0.65))
    assert choose_regime([(r, _summary(d, {})) for r, d in cands])["choice"]["max_steps"] == 60
    lams = [(1.0, _accs(0.95, 0.95, 0.60, 0.62, 0.95)), (3.0, _accs(0.95, 0.95, 0.60, 0.70, 0.94)),
            (10.0, _accs(0.95, 0.95, 0.60, 0.80, 0.85))]  # lambda 10 costs 10 points on English: excluded
    pick = [choose_lambda([(lam, _summary(d, {k: t for k in d})) for lam, d in lams])["choice"] for t in (0.0, 1.0)]
    assert pick == [3.0, 3.0]


def _item_scores(part_scores: dict) -> tuple[dict, list]:
    """part_scores: {(arm, part): [0/1 per item of (clone, en_only)]} for one valid world; one FT seed."""
    items = sorted({(part, i) for (_, part), v in part_scores.items() for i in range(len(v))})
    meta = {f"clone|{part}{i}": ("clone", "en_only", part) for part, i in items}
    entries = []
    for arm in sorted({a for a, _ in part_scores}):
        scores = {f"clone|{part}{i}": v for (a, part), vals in part_scores.items() if a == arm
                  for i, v in enumerate(vals)}
        entries.append({"world": "w", "world_seed": 0, "arm": arm, "ft_seed": 0, "scores": scores, "meta": meta})
    return {"worlds": [{"world": "w", "world_seed": 0, "valid": True}]}, entries


def test_comparisons_read_the_part_they_are_asked_for():
    # on dev SARA wins 10 of 20 items SFT lost; on test the two arms are identical
    summary, entries = _item_scores({("sft", "dev"): [0] * 20, ("sara", "dev"): [1] * 10 + [0] * 10,
                                     ("sft", "test"): [1] * 20, ("sara", "test"): [1] * 20})
    dev = [c for c in comparisons(summary, entries, part="dev") if (c["arm"], c["baseline"]) == ("sara", "sft")][0]
    test = [c for c in comparisons(summary, entries) if (c["arm"], c["baseline"]) == ("sara", "sft")][0]
    assert dev["diff_mean"] == pytest.approx(0.5) and dev["p_value"] < 0.01 and dev["per_world_seed"][0]["n_items"] == 20
    assert test["diff_mean"] == 0.0 and test["p_value"] == 1.0


def _search_summary(per_seed_sft, per_seed_shuf, cost=0.0, test_diff=0.0):
    """Dev comparisons of one candidate: per world seed (diff, p) of SARA vs SFT and vs shuffled."""
    def comp(baseline, split, lang, per_seed, diff=None):
        rows = [{"world_seed": s, "diff": d, "p_value": p, "n_items": 48} for s, (d, p) in enumerate(per_seed)]
        mean = sum(d for d, _ in per_seed) / len(per_seed) if diff is None else diff
        return {"arm": "sara", "baseline": baseline, "split": split, "lang": lang, "diff_mean": mean,
                "n_world_seeds": len(rows), "per_world_seed": rows}
    dev = [comp("sft", "en_only", "clone", per_seed_sft), comp("sara_shuffled", "en_only", "clone", per_seed_shuf),
           comp("sft", "shared", "en", [(0.0, 1.0)], diff=-cost), comp("sft", "shared", "clone", [(0.0, 1.0)], diff=0.0)]
    test = [{**c, "diff_mean": test_diff} for c in dev]
    worlds = [{"world": "routed_topic", "world_seed": s, "valid": True} for s in range(len(per_seed_sft))]
    return {"worlds": worlds, "dev_comparisons": dev, "comparisons": test}


def test_search_counts_seeds_that_beat_both_baselines_on_dev():
    win, tie = (0.1, 0.01), (0.02, 0.4)
    strong = _search_summary([win] * 4 + [tie], [win] * 4 + [tie])           # 4 of 5 seeds beat both
    half = _search_summary([win] * 5, [win, win, tie, tie, tie])             # beats SFT everywhere, shuffled in 2
    costly = _search_summary([win] * 5, [win] * 5, cost=0.05)                 # 5 wins but costs 5 points on English
    result = choose_search([("half", half), ("strong", strong), ("costly", costly)])
    rows = {r["candidate"]: r for r in result["table"]}
    assert rows["strong"]["wins"] == 4 and rows["strong"]["win_seeds"] == [0, 1, 2, 3]
    assert rows["half"]["wins"] == 2 and rows["costly"]["wins"] == 5 and rows["costly"]["cost"] == pytest.approx(0.05)
    assert result["choice"] == "strong" and result["bar_met"]
    # test numbers never move the choice
    flipped = [(n, {**s, "comparisons": [{**c, "diff_mean": -1.0} for c in s["comparisons"]]})
               for n, s in (("half", half), ("strong", strong), ("costly", costly))]
    assert choose_search(flipped)["choice"] == "strong"
    # nothing reaches the bar: the best candidate is still named, and the record says the bar was missed
    weak = choose_search([("half", half)])
    assert weak["choice"] == "half" and not weak["bar_met"]
    # the search report's verdict follows the record: met, and not met with the best candidate named
    seeds = {"world_seeds": [0, 1, 2, 3, 4]}
    met, missed = render_search({**result, **seeds}), render_search({**weak, **seeds})
    assert "The dev choice, strong, meets the bar of 4 world seeds" in met and "4 of 5 valid world seeds" in met
    assert "| costly | 5 of 5 | 5 | +10.0 | +10.0 | 5.0 (excluded) |" in met
    assert "The dev choice, half, does not meet the bar" in missed and "in 2 of 5 valid world seeds (seeds: 0, 1)" in missed
    assert "SARA − SFT +10.0, SARA − shuffled +5.2 points"  # (2 x 10 + 3 x 2) / 5 in missed


def test_search_rejects_recipe_overrides_it_owns(tmp_path):
    with pytest.raises(ValueError, match=r"recipe_overrides\['lambda_js'\].*lambdas"):
        search(tmp_path, recipe_overrides={"lambda_js": 2.0})
    with pytest.raises(TypeError, match="max_step"):
        search(tmp_path, recipe_overrides={"max_step": 240})
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


# ----------------------------------------------------------------------------- sentences follow numbers


def _comparison(diff, p, per_seed=(0.05, 0.02, -0.01)):
    return {"world": "routed_topic", "split": "en_only", "lang": "clone", "arm": "sara", "baseline": "sft",
            "diff_mean": diff, "p_value": p, "n_world_seeds": len(per_seed), "n_positive": sum(d > 0 for d in per_seed),
            "n_significant_positive": 1, "n_significant_negative": 0, "diff_min": min(per_seed),
            "diff_max": max(per_seed)}


def test_sentences_follow_the_numbers():
    win = comparison_sentence(_comparison(0.042, 0.003))
    assert "SARA is better than SFT" in win and "+4.2 points" in win and "p = 0.003" in win
    assert "positive in 2 of 3 world seeds" in win
    loss = comparison_sentence(_comparison(-0.031, 0.01, per_seed=(-0.05, -0.02, -0.023)))
    assert "SARA is worse than SFT" in loss and "-3.1 points" in loss and "positive in 0 of 3" in loss
    tie = comparison_sentence(_comparison(0.012, 0.41))
    assert "no significant difference between SARA and SFT" in tie and "+1.2 points" in tie
    assert pts(0.0) == "0.0" and pts(-0.0004) == "0.0" and pts(0.1234) == "+12.3"


def test_summary_sentences_report_invalid_worlds_and_routing():
    summary = {
        "worlds": [{"world": "w", "world_seed": 0, "valid": True, "reasons": []},
                   {"world": "w", "world_seed": 1, "valid": False, "reasons": ["base English shared-fact dev accuracy 50.0 < 90"]}],
        "config": {"validity": {"en_shared_min": 0.9, "clone_en_only_max": 0.95}},
        "selected": {"recipe": {"align_layers": [1, 2]}},
        "comparisons": [{**_comparison(-0.031, 0.01), "world": "w"}],
        "routing": [{"world": "w", "world_seed": 0, "arm": a, "layers": [0, 1, 2, 3], "clone_js": [0.1, v, v, 0.1]}
                    for a, v in (("base", 0.4), ("sft", 0.38), ("sara", 0.2))],
    }
    lines = summary_sentences(summary, "w")
    assert lines[0].startswith("1 of 2 world seeds are valid") and "World seed 1 is left out" in lines[0]
    assert any("SARA is worse than SFT (-3.1 points" in line for line in lines)
    assert any("base 0.400 → SFT 0.380, SARA 0.200" in line for line in lines)
    flipped = copy.deepcopy(summary)
    flipped["comparisons"][0].update(diff_mean=0.05, p_value=0.0004)
    assert any("SARA is better than SFT (+5.0 points, p < 0.001" in line for line in summary_sentences(flipped, "w"))


# ----------------------------------------------------------------------------- world validity


def test_validity_reads_knowledge_not_the_template():
    from sara_moe.experiment.run import CLONE, VALIDITY, validity

    items = [{"key": f"{lang}|{split}{i}", "lang": lang, "split": split, "part": "dev"}
             for lang in ("en", CLONE) for split in ("shared", "en_only") for i in range(10)]
    templated = {r["key"]: int(r["lang"] == "en" and int(r["key"][-1]) < 2) for r in items}  # 20% on English
    knows = {r["key"]: 1 for r in items if r["lang"] == "en"}
    verdict = validity(templated, items, VALIDITY, knowledge=knows)
    assert verdict["valid"] and verdict["en_shared_dev"] == pytest.approx(0.2)
    assert verdict["en_shared_known_dev"] == 1.0 and verdict["en_en_only_known_dev"] == 1.0
    # forgetting a tenth of the English-only facts (90% is the floor) still passes; two tenths fail, named
    assert validity(templated, items, VALIDITY, knowledge={**knows, "en|en_only0": 0})["valid"]
    worse = validity(templated, items, VALIDITY, knowledge={**knows, "en|en_only0": 0, "en|en_only1": 0})
    assert not worse["valid"] and worse["reasons"] == [
        "base model knows 80.0% (en_only) of English dev facts as pretraining sentences, < 90%: it did not learn English"]
    both = validity(templated, items, VALIDITY, knowledge={k: 0 for k in knows})
    assert both["reasons"][0].startswith("base model knows 0.0% (shared) and 0.0% (en_only) of English dev facts")
    # the earlier rule (templated accuracy) can still be applied, e.g. to compare with old summaries
    old = validity(templated, items, {"en_shared_min": 0.9, "clone_en_only_max": 0.95})
    assert not old["valid"] and "20.0 < 90 (templated" in old["reasons"][0]
    at_ceiling = {**templated, **{r["key"]: 1 for r in items if r["lang"] == CLONE}}
    assert "no room for a transfer gain" in validity(at_ceiling, items, VALIDITY, knowledge=knows)["reasons"][0]
    with pytest.raises(ValueError, match="knowledge"):
        validity(templated, items, VALIDITY)


def test_accuracy_plot_draws_arms_as_categories_with_confidence_intervals():
    from matplotlib.container import ErrorbarContainer

    from sara_moe.experiment.design import CLONE

    # 3 arms x 3 world seeds (seed 2 invalid) x 2 FT seeds; acc = (arm base + seed + ft) / 100
    base = {"base": 10, "sft": 40, "sara": 60}
    runs = [{"world": "w", "world_seed": seed, "arm": arm, "split": split, "lang": CLONE,
             "acc": (b + 2 * seed + ft + (5 if split == "shared" else 0)) / 100}
            for arm, b in base.items() for seed in (0, 1, 2) for ft in (0, 1) for split in ("en_only", "shared")]
    runs += [{**r, "lang": "en"} for r in runs[:4]]  # other languages are not drawn
    summary = {"runs": runs, "worlds": [{"world": "w", "world_seed": s, "valid": s != 2} for s in (0, 1, 2)]}
    entries = arm_accuracy(summary, "w", "en_only")
    assert [e["arm"] for e in entries] == ["base", "sft", "sara"]
    sara = entries[2]
    # valid runs of sara on en_only: 60, 61 (seed 0) and 62, 63 (seed 1); the invalid seed 2 (64, 65) is left out
    assert sara["n_runs"] == 4 and sara["mean"] == pytest.approx(61.5)
    assert 60 <= sara["ci_low"] < 61.5 < sara["ci_high"] <= 63
    assert [(s["world_seed"], s["mean"], s["valid"]) for s in sara["per_world_seed"]] == \
        [(0, pytest.approx(60.5), True), (1, pytest.approx(62.5), True), (2, pytest.approx(64.5), False)]

    fig = draw_world(summary, "w")
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "sft", "sara"]
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 3  # one dot with its CI per arm
        for x, bar in enumerate(bars):
            assert list(bar.lines[0].get_xdata()) == [x]
        for line in ax.get_lines():  # nothing joins arms: every line lies at one arm
            xdata = list(line.get_xdata())
            assert len(xdata) <= 2 and len({round(float(v)) for v in xdata}) <= 1, xdata
        assert not any(line.get_linestyle() not in ("None", "none", "") and len(line.get_xdata()) > 1
                       and len({round(float(v)) for v in line.get_xdata()}) > 1 for line in ax.get_lines())
    mean_y = [b.lines[0].get_ydata()[0] for b in
              [c for c in fig.axes[1].containers if isinstance(c, ErrorbarContainer)]]
    assert mean_y == pytest.approx([16.5, 46.5, 66.5])  # shared split: +5
