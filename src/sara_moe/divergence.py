"""Pure tensor math for routing distributions: pooling and divergences (no model code).

    from sara_moe import divergence as D
    p = D.masked_mean(probs, mask)          # [B, S, E] x [B, S] -> [B, E]
    D.js_divergence(p, q)                   # [B] symmetric JS, natural log, fp32, <= ln 2

Every function works on the last dimension (experts) and broadcasts over the leading ones
(batch, layer), computes in fp32, and clamps probabilities at `eps` before taking logs, as
the SARA authors' code does (eps = 1e-8). Conventions:

- `js_divergence(p, q) = 0.5 KL(p || m) + 0.5 KL(q || m)`, `m = (p + q) / 2`.
- `kl_divergence(p, q) = sum p log(p / q)`.
- `normalized_js(p, q) = JS / (log E - mean(H(p), H(q)))` (Bandarkar et al.'s
  entropy-normalised JS: divergence relative to how peaked the two distributions are).
- `topk_overlap(p, q, k)`: Jaccard index of the k experts with the most mass in each.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8


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


def entropy(p: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    p = p.float().clamp_min(eps)
    return -(p * p.log()).sum(dim=-1)


def normalized_js(p: torch.Tensor, q: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    num_experts = p.shape[-1]
    headroom = math.log(num_experts) - 0.5 * (entropy(p, eps) + entropy(q, eps))
    return js_divergence(p, q, eps) / headroom.clamp_min(eps)


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
    """Divergence by name, as the training config spells it ("js" or "kl": KL(p || q))."""
    if name == "js":
        return js_divergence(p, q)
    if name == "kl":
        return kl_divergence(p, q)
    raise ValueError(f"divergence must be 'js' or 'kl', got {name!r}")
