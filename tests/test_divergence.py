"""Golden values and properties of the divergence math (computed independently here)."""

import math

import pytest
import torch

from sara_moe import divergence as D


def test_js_golden_value():
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.9, 0.1])
    m = [0.7, 0.3]
    expected = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1]))
    assert D.js_divergence(p, q).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.1018, abs=1e-4)  # literal check of the formula above


def test_js_of_disjoint_distributions_is_ln2():
    assert D.js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(math.log(2), rel=1e-6)


def test_kl_golden_value_and_direction():
    p, q = torch.tensor([0.2, 0.8]), torch.tensor([0.5, 0.5])
    assert D.kl_divergence(p, q).item() == pytest.approx(0.2 * math.log(0.4) + 0.8 * math.log(1.6), rel=1e-6)
    assert D.kl_divergence(p, q).item() == pytest.approx(0.192745, abs=1e-6)
    assert D.kl_divergence(q, p).item() == pytest.approx(0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8), rel=1e-6)


def test_entropy_normalized_js_golden_value():
    p, q = torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.1, 0.7, 0.1, 0.1])
    m = [0.4, 0.4, 0.1, 0.1]
    js = 0.5 * sum(a * math.log(a / b) for a, b in zip([0.7, 0.1, 0.1, 0.1], m)) * 2  # symmetric case: KLs are equal
    h = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    assert D.js_divergence(p, q).item() == pytest.approx(js, rel=1e-6)
    assert D.entropy_normalized_js(p, q).item() == pytest.approx(js / (math.log(4) - h), rel=1e-5)
    # two uniform distributions: no headroom, Bandarkar et al.'s floor of 1e-6 keeps it finite (0 / 1e-6)
    u = torch.full((3,), 1 / 3)
    assert D.entropy_normalized_js(u, u).item() == pytest.approx(0.0, abs=1e-6)


def test_exact_js_and_entropy_treat_zeros_as_zero_mass():
    p, q = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.5, 0.0, 0.5])
    # m = (0.5, 0.25, 0.25): KL(p || m) = 0.5 ln 2 = KL(q || m), so JS = 0.5 ln 2
    assert D.js_exact(p, q).item() == pytest.approx(0.5 * math.log(2), rel=1e-6)
    assert D.entropy(p).item() == pytest.approx(math.log(2), rel=1e-6)
    # ln 3 - ln 2 of headroom: 0.5 ln 2 / ln 1.5 = 0.854756...
    assert D.entropy_normalized_js(p, q).item() == pytest.approx(0.5 * math.log(2) / math.log(1.5), rel=1e-6)
    assert D.entropy_normalized_js(p, q).item() == pytest.approx(0.854756, abs=1e-6)
    # SARA's clamped JS differs from the exact one only by the clamp (~1e-7 here)
    assert abs(D.js_divergence(p, q).item() - D.js_exact(p, q).item()) < 1e-6


def test_topk_overlap_and_cosine_golden():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    q = torch.tensor([[0.1, 0.3, 0.2, 0.4], [0.3, 0.4, 0.2, 0.1]])
    assert D.topk_overlap(p, q, 2).tolist() == pytest.approx([1 / 3, 1.0])
    assert D.topk_overlap(p, q, 4).tolist() == pytest.approx([1.0, 1.0])
    dot = 0.4 * 0.1 + 0.3 * 0.3 + 0.2 * 0.2 + 0.1 * 0.4
    norm = math.sqrt(0.16 + 0.09 + 0.04 + 0.01)
    assert D.cosine(p[0], q[0]).item() == pytest.approx(dot / norm**2, rel=1e-6)
    with pytest.raises(ValueError, match="0 < k <= 4"):
        D.topk_overlap(p, q, 5)


def test_masked_mean_ignores_pads():
    probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert D.masked_mean(probs, mask).tolist() == [[0.5, 0.5]]
    assert D.masked_mean(probs, torch.tensor([[0, 1, 0]])).tolist() == [[0.0, 1.0]]


def test_js_properties_on_random_distributions():
    gen = torch.Generator().manual_seed(0)
    for experts in (2, 8, 64, 128):
        logits = torch.randn(500, 2, experts, generator=gen) * torch.rand(500, 1, 1, generator=gen) * 8
        p, q = logits.softmax(-1).unbind(1)
        js = D.js_divergence(p, q)
        assert torch.allclose(js, D.js_divergence(q, p), atol=1e-7)
        assert (js >= -1e-7).all() and (js <= math.log(2) + 1e-6).all()
        assert D.js_divergence(p, p).abs().max() < 1e-6
        assert (D.kl_divergence(p, q) >= -1e-6).all()
    assert D.js_divergence(torch.rand(3, 5, 8).softmax(-1), torch.rand(3, 5, 8).softmax(-1)).shape == (3, 5)


def test_js_computes_in_fp32_from_bf16():
    p = torch.tensor([0.5, 0.5], dtype=torch.bfloat16)
    q = torch.tensor([0.9, 0.1], dtype=torch.bfloat16)
    assert D.js_divergence(p, q).dtype == torch.float32


def test_divergence_by_name():
    p, q = torch.tensor([0.2, 0.8]), torch.tensor([0.5, 0.5])
    assert D.divergence("kl", p, q) == D.kl_divergence(p, q)
    assert D.divergence("js", p, q) == D.js_divergence(p, q)
    with pytest.raises(ValueError, match="'js' or 'kl'"):
        D.divergence("tv", p, q)
