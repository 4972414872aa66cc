"""Pure tensor math for routing distributions: pooling and divergences (no model code).

    from sara_moe import divergence as D
    p = D.masked_mean(probs, mask)          # [B, S, E] x [B, S] -> [B, E]
    D.js_divergence(p, q)                   # [B] symmetric JS, natural log, fp32, <= ln 2 (SARA's loss)
    D.entropy_normalized_js(p, q)           # [B] Bandarkar et al.'s per-pair entropy-normalised JS

Every function works on the last dimension (experts) and broadcasts over the leading ones
(batch, layer) and computes in fp32. Two conventions for zeros, each the one its paper uses:

- `js_divergence(p, q) = 0.5 KL(p || m) + 0.5 KL(q || m)`, `m = (p + q) / 2`, with p and q
  clamped at `eps = 1e-8` before the logs — the SARA authors' training loss (Dong et al.).
- `js_exact(p, q)`: the same JS with `0 · log 0 = 0` and only `m` clamped (at 1e-10) — Bandarkar
  et al.'s `analysis_helpers.js_divergence`, exact also for sparse (dispatched top-k)
  distributions. On dense softmax routing the two agree to ~1e-7.
- `kl_divergence(p, q) = sum p log(p / q)` (p, q clamped at eps). Bandarkar et al.'s alignment
  loss is `kl_divergence(english, target)`; `divergence("kl", ...)` keeps the argument order.
- `entropy(p) = -sum p log p` with `0 · log 0 = 0` (Bandarkar et al.'s `calculate_entropy`).
- `entropy_normalized_js(p, q) = js_exact(p, q) / max(log E - (H(p) + H(q)) / 2, 1e-6)` —
  Bandarkar et al.'s `calculate_entropy_normalized_jsd`, applied per parallel pair.
- `topk_overlap(p, q, k)`: Jaccard index of the k experts with the most mass in each.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8
M_FLOOR = 1e-10  # Bandarkar et al. clamp the mixture m only
HEADROOM_FLOOR = 1e-6  # their floor on log E - mean entropy


def masked_mean(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `[..., S, E]` over the tokens where `mask [..., S]` is nonzero -> `[..., E]`."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    total = (probs.float() * weights).sum(dim=-2)
    count = weights.sum(dim=-2).clamp_min(1.0)
    return total / count


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    p, q = p.float().clamp_min(eps), q.float().clamp_min(eps)
    return (p * (p.log() - q.log())).sum(dim=-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    p, q = p.float().clamp_min(eps), q.float().clamp_min(eps)
    m = 0.5 * (p + q)
    log_m = m.log()
    return 0.5 * (p * (p.log() - log_m)).sum(-1) + 0.5 * (q * (q.log() - log_m)).sum(-1)


def js_exact(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JS with 0·log 0 = 0: zero entries of p or q contribute nothing (sparse-safe)."""
    p, q = p.float(), q.float()
    log_m = (0.5 * (p + q)).clamp_min(M_FLOOR).log()
    xlogy = torch.special.xlogy
    return 0.5 * (xlogy(p, p) - p * log_m).sum(-1) + 0.5 * (xlogy(q, q) - q * log_m).sum(-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats with 0·log 0 = 0."""
    p = p.float()
    return -torch.special.xlogy(p, p).sum(dim=-1)


def entropy_normalized_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Bandarkar et al.'s JS(p, q) / max(log E - (H(p) + H(q)) / 2, 1e-6), per pair of rows."""
    headroom = math.log(p.shape[-1]) - 0.5 * (entropy(p) + entropy(q))
    return js_exact(p, q) / headroom.clamp_min(HEADROOM_FLOOR)


def topk_overlap(p: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """Jaccard index |A ∩ B| / |A ∪ B| of the top-k expert sets of p and q."""
    if not 0 < k <= p.shape[-1]:
        raise ValueError(f"top-k overlap needs 0 < k <= {p.shape[-1]} experts, got k={k}")
    a = torch.zeros(p.shape, dtype=torch.bool, device=p.device).scatter_(-1, p.topk(k, dim=-1).indices, True)
    b = torch.zeros(q.shape, dtype=torch.bool, device=q.device).scatter_(-1, q.topk(k, dim=-1).indices, True)
    inter = (a & b).sum(-1).float()
    union = (a | b).sum(-1).float()
    return inter / union


def cosine(p: torch.Tensor, q: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(p.float(), q.float(), dim=-1, eps=eps)


def divergence(name: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Divergence by name, as the training config spells it: "js" (symmetric) or "kl" = KL(p || q)."""
    if name == "js":
        return js_divergence(p, q)
    if name == "kl":
        return kl_divergence(p, q)
    raise ValueError(f"divergence must be 'js' or 'kl', got {name!r}")
