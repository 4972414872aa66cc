"""`sara testbed`: generator output validates, clones translate exactly, pretraining learns, clones route apart."""

from __future__ import annotations

import json

import pytest

from sara_moe.data.corpus import read_corpus
from sara_moe.evaluation.items import read_items
from sara_moe.testbed.build import TestbedConfig, build
from sara_moe.testbed.pretrain import pretrain
from sara_moe.testbed.world import Clone, World

SMALL = dict(num_persons=24, num_documents=1500, hidden_size=64, max_steps=60, seq_len=48,
             clones=[{"name": "c1", "share": 0.2, "entities": "separate"},
                     {"name": "c2", "share": 0.1, "entities": "shared"},
                     {"name": "c3", "share": 0.05, "entities": "shared", "swap": True, "split": True}])


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    build(TestbedConfig(seed=3, **SMALL), out)
    return out


@pytest.fixture(scope="module")
def pretrained(testbed, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    log = pretrain(testbed, out, progress=False)
    return out, log


def test_outputs_validate_against_loaders(testbed):
    info = json.loads((testbed / "testbed.json").read_text())
    groups = list(read_corpus(testbed / "instruct.jsonl", anchor="en"))
    assert len(groups) == info["counts"]["instruct_groups"] > 0
    assert all(set(g.texts) == {"en", "c1", "c2", "c3"} for g in groups)
    assert all(g.texts["en"]["response"].startswith("answer :") for g in groups)  # answers restate the fact
    assert len(list(read_corpus(testbed / "probe.jsonl", anchor="en"))) == 64
    seen_ids = {}
    for half in ("shared", "en_only"):
        task, items = read_items(testbed / f"eval_mc_{half}.jsonl")
        assert task == "mc" and {i.lang for i in items} == {"en", "c1", "c2", "c3"}
        assert all(i.id.startswith(f"{half}:") for i in items)
        seen_ids[half] = {i.id for i in items}
    assert not seen_ids["shared"] & seen_ids["en_only"]
    finetuned = {g.id.split("-", 2)[2].replace("-", ":") for g in groups}
    heldout = {i.split(":", 1)[1] for ids in seen_ids.values() for i in ids}
    assert not finetuned & heldout  # held-out facts never fine-tuned on
    assert read_items(testbed / "eval_gen.jsonl")[0] == "gen"
    # EN-only facts never appear in a clone's pretraining text
    en_only = set(info["fact_split"]["en_only"]["heldout"]) | set(info["fact_split"]["en_only"]["finetune"])
    docs = [json.loads(line) for line in (testbed / "pretrain.jsonl").open()]
    c2_sentences = [set(sent.split()) for d in docs if d["lang"] == "c2" for sent in d["text"].split(" . ")]
    assert c2_sentences
    for key in en_only:
        person, attr = key.split(":")
        assert not any(person in words and info["facts"][key] in words for words in c2_sentences), key
    assert info["counts"]["pretrain_docs"]["en"] > info["counts"]["pretrain_docs"]["c1"] > \
        info["counts"]["pretrain_docs"]["c3"]


def test_clone_translation_is_exact_and_disjoint():
    clones = [Clone("c1", entities="separate"), Clone("c2"), Clone("c3", swap=True), Clone("c4", split=True,
                                                                                         swap=True)]
    world = World(seed=1, num_persons=10, clones=clones)
    sentences = [world.fact_sentence(p, a, t) for p in range(10) for a in ("city", "food", "job", "colour")
                 for t in (0, 1)] + [world.question(3, "job"), world.answer(4, "food"), world.addition(3, 9)]
    english = set(world.function_words)
    for words in sentences:
        for lang in ("c1", "c2", "c3", "c4"):
            cloned = world.translate(words, lang)
            assert world.back_translate(cloned, lang) == words
            if lang == "c1":
                assert len(cloned) == len(words) and not set(cloned) & (english | set(words))
            if lang == "c2":  # function words cloned, entities shared, token by token
                assert [w for w in cloned if w in words] == [w for w in words if w[0].isalpha() and w[1:].isdigit()]
    vocab = world.vocabulary()
    assert len(vocab) == len(set(vocab))


def test_build_is_deterministic(testbed, tmp_path):
    build(TestbedConfig(seed=3, **SMALL), tmp_path)
    for name in ("pretrain.jsonl", "instruct.jsonl", "eval_mc_en_only.jsonl", "testbed.json"):
        assert (tmp_path / name).read_text() == (testbed / name).read_text()


def test_short_pretrain_lowers_loss_and_loads(pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, log = pretrained
    assert log["final_loss"] < 0.6 * log["first_loss"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok) and model.config.output_router_logits


def test_c1_routes_apart_from_english(pretrained, testbed, tmp_path):
    """C1 (a vocabulary disjoint from English) routes apart from its parallel English sentence: in every MoE
    layer the pairwise JS (js_pair_mean) of C1 vs English is at least 1.5x that of a different English
    sentence vs English, i.e. the language moves routing more than the content does.

    Measured, C1 / en_other per MoE layer: 2.1, 3.7, 6.1, 4.7 for this world (seed 3); the smallest layer
    ratio for world seeds 4, 5, 6 is 2.0, 2.2, 3.0. 1.5 leaves a margin for numeric drift across machines
    and still fails if C1 routed like English (a ratio near 1)."""
    from sara_moe.analysis.analyze import analyze

    out, _ = pretrained
    result = analyze(str(out), str(testbed / "probe.jsonl"), str(tmp_path / "a"), langs=["c1", "en_other"],
                     device="cpu")
    js = result["metrics"]["js_pair_mean"]
    ratios = [c1 / other for c1, other in zip(js["c1"], js["en_other"])]
    assert len(ratios) == len(result["moe_layers"]) and min(ratios) >= 1.5, ratios
