"""Golden values of the routing maps, computed by hand here from the formulas the docs cite."""

import math

import pytest
import torch

from sara_moe.analysis.maps import RoutingTally, expert_classes, recommend_band, specialisation

LN2, LN3 = math.log(2), math.log(3)


def _two_pairs():
    """anchor q_i and language p_i for two parallel groups, one layer, three experts."""
    anchor = torch.tensor([[[0.5, 0.0, 0.5]], [[1 / 3, 1 / 3, 1 / 3]]])
    lang = torch.tensor([[[0.5, 0.5, 0.0]], [[1 / 3, 1 / 3, 1 / 3]]])
    return torch.stack([anchor, lang])  # [langs, groups, layers, experts]


def test_per_pair_and_corpus_metrics_golden():
    tally = RoutingTally(["en", "sw"], num_layers=1, num_experts=3, topk=1)
    tally.add(_two_pairs(), torch.ones(2, 2, dtype=torch.bool))
    out = tally.finish()
    m = out["metrics"]
    # pair 1: m = (1/2, 1/4, 1/4), JS = 0.5 ln 2; H = ln 2 for both, headroom ln 3 - ln 2. pair 2: identical, 0.
    assert m["js_pair_mean"]["sw"] == pytest.approx([(0.5 * LN2 + 0) / 2], rel=1e-6)
    assert m["js_pair_mean"]["sw"][0] == pytest.approx(0.173287, abs=1e-6)
    # Bandarkar et al.: normalise per pair, then average (the uniform pair has no headroom: 0 / 1e-6 = 0)
    assert m["js_pair_norm"]["sw"] == pytest.approx([(0.5 * LN2 / (LN3 - LN2) + 0) / 2], rel=1e-6)
    assert m["js_pair_norm"]["sw"][0] == pytest.approx(0.427378, abs=1e-6)
    # corpus means P = (5/12, 5/12, 1/6), Q = (5/12, 1/6, 5/12), M = (5/12, 7/24, 7/24); JS = KL(P || M) by symmetry
    js_corpus = 5 / 12 * math.log(10 / 7) + 1 / 6 * math.log(4 / 7)
    assert m["js_corpus"]["sw"] == pytest.approx([js_corpus], rel=1e-5)
    assert js_corpus == pytest.approx(0.055345, abs=1e-6)
    assert out["routing_entropy"]["en"] == pytest.approx([(LN2 + LN3) / 2], rel=1e-6)
    matrix = out["all_pairs_js"]["js_pair_mean"][0]  # layer 0: [langs][langs]
    assert [matrix[0][0], matrix[1][1]] == [0, 0] and matrix[0][1] == matrix[1][0] == pytest.approx(0.25 * LN2)
    assert out["num_pairs"] == {"sw": 2}


def test_tallies_of_parts_add_up_to_the_whole_and_skip_absent_languages():
    pooled = _two_pairs()
    whole = RoutingTally(["en", "sw"], 1, 3, 1)
    whole.add(pooled, torch.ones(2, 2, dtype=torch.bool))
    first, second = RoutingTally(["en", "sw"], 1, 3, 1), RoutingTally(["en", "sw"], 1, 3, 1)
    first.add(pooled[:, :1], torch.ones(2, 1, dtype=torch.bool))
    second.add(pooled[:, 1:], torch.ones(2, 1, dtype=torch.bool))
    first.merge(second)
    assert first.finish()["metrics"] == whole.finish()["metrics"]
    # a group without the language leaves only the other pair
    partial = RoutingTally(["en", "sw"], 1, 3, 1)
    garbage = pooled.clone()
    garbage[1, 1] = torch.tensor([1.0, 0.0, 0.0])
    partial.add(garbage, torch.tensor([[True, True], [True, False]]))
    assert partial.finish()["metrics"]["js_pair_mean"]["sw"] == pytest.approx([0.5 * LN2], rel=1e-6)
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(RoutingTally(["en", "yo"], 1, 3, 1))


def test_expert_classes_and_specialisation_golden():
    counts = torch.tensor([[[10.0, 10.0, 0.0, 0.0]], [[0.0, 10.0, 10.0, 0.0]]])  # [langs, layers, experts]
    assert expert_classes(counts, ["en", "sw"]) == [["exclusive:en", "shared", "exclusive:sw", "unused"]]
    # P(e) = (1/4, 1/2, 1/4, 0): H(E) = 1.5 ln 2, H(E | L) = ln 2, I = 0.5 ln 2, H(L) = ln 2
    assert specialisation(counts) == pytest.approx([0.5], rel=1e-6)
    assert specialisation(torch.tensor([[[5.0, 5.0]], [[1.0, 1.0]]])) == pytest.approx([0.0], abs=1e-9)
    assert specialisation(torch.tensor([[[5.0, 0.0]], [[0.0, 3.0]]])) == pytest.approx([1.0], rel=1e-6)
    # the use threshold: 0.04 of the slots is below 0.2 / 4 = 0.05 of a uniform share
    low = torch.tensor([[[96.0, 4.0, 0.0, 0.0]]])
    assert expert_classes(low, ["en"]) == [["exclusive:en", "unused", "unused", "unused"]]


def test_recommended_band_rule():
    layers = [0, 1, 2, 3, 4, 5]
    # outer layers excluded; interior (0.1, 0.12, 0.4, 0.11): threshold 0.25, runs [1, 2] and [4] -> longest
    assert recommend_band([0.5, 0.1, 0.12, 0.4, 0.11, 0.6], layers, [2, 3]) == [1, 2]
    # equal-length runs: the one holding the minimum
    assert recommend_band([0.5, 0.2, 0.4, 0.1, 0.6], [3, 5, 7, 9, 11], [5]) == [9]
    assert recommend_band([0.3] * 5, [0, 1, 2, 3, 4], [1, 2]) == [1, 2]  # flat: the paper's band
    with pytest.raises(ValueError, match="2 values for 3 MoE layers"):
        recommend_band([0.1, 0.2], [0, 1, 2], [1])
