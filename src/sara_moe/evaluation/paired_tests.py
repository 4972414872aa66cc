"""Paired significance tests over items, used by `sara report`.

    from sara_moe.evaluation.paired_tests import paired_bootstrap, mcnemar_exact
    paired_bootstrap(ref_scores, arm_scores)   # {"diff", "ci_low", "ci_high", "p"}; diff = mean(arm - ref)
    mcnemar_exact([0, 1, 1], [1, 1, 0])        # {"b_only", "a_only", "p"} for binary outcomes

The bootstrap resamples the per-item differences (10,000 times, seeded); p is two-sided,
`2·min(P*(Δ<0), P*(Δ>0))` with resampled means of exactly 0 counting half to each side.
McNemar is the exact binomial test on the discordant pairs.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000



def paired_bootstrap(a, b, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Paired bootstrap of mean(b - a) over items: {diff, ci_low, ci_high, p}."""
    diffs = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if diffs.size == 0:
        raise ValueError("paired test over zero items")
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(resamples, diffs.size))].mean(axis=1)
    ties = float((means == 0).mean()) / 2  # resampled means of exactly 0 count half to each side
    p = min(1.0, 2.0 * min(float((means < 0).mean()) + ties, float((means > 0).mean()) + ties))
    low, high = np.percentile(means, [2.5, 97.5])
    return {"diff": float(diffs.mean()), "ci_low": float(low), "ci_high": float(high), "p": p}


def mcnemar_exact(a, b) -> dict:
    """Exact (binomial) McNemar test on binary paired outcomes: {b_only, a_only, p}."""
    b_only = sum(1 for x, y in zip(a, b) if y > x)
    a_only = sum(1 for x, y in zip(a, b) if x > y)
    n, k = b_only + a_only, min(b_only, a_only)
    p = 1.0 if n == 0 else min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"b_only": b_only, "a_only": a_only, "p": p}


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std
