"""Hidden-state alignment per decoder layer, read beside the routing maps (`sara analyze`).

    from sara_moe.analysis.hidden_alignment import pool_hidden, HiddenTally
    weighted, mean = pool_hidden(outputs.hidden_states, attention_mask)   # [B, layers, H] each
    tally = HiddenTally(["en", "sw"], num_layers)
    tally.add(weighted_by_lang, mean_by_lang, present)                   # one batch of groups
    tally.merge(other)                                                   # sums add across chunks / ranks
    tally.finish()   # {"mexa": {lang: [per layer]}, "cosine": {lang: [per layer]}, ...}

Two numbers per language and decoder layer (the output of layer i is `hidden_states[i + 1]`),
each against the anchor's parallel text:

- `mexa`: MEXA's alignment score (Kargaran et al., 2024, "MEXA: Multilingual Evaluation of
  English-Centric LLMs via Cross-Lingual Alignment"). Sentence embeddings are MEXA's
  position-weighted mean of the layer's states (token t of n real tokens weighted t / sum 1..n);
  with C[i, j] = cos(target_i, anchor_j) over a pool of N parallel pairs, pair i counts when
  C[i, i] is strictly larger than every other entry of its row and of its column. The pool
  here is the analysis batch (`--batch-size` groups that have both languages), so the score
  is comparable across languages and layers of one run, and with MEXA's own numbers only at
  the same pool size; batches with a single pair are skipped.
- `cosine`: mean over pairs of cos(plain mean-pooled target states, plain mean-pooled anchor
  states) (sara-moe's own summary).
"""

from __future__ import annotations

import torch

from sara_moe.analysis.maps import StreamingSums


def pool_hidden(hidden_states, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MEXA position-weighted mean, plain mean) of each decoder layer's output: `[B, layers, H]` fp32 CPU."""
    mask = attention_mask.float()
    positions = mask.cumsum(-1) * mask  # 1..n over real tokens, 0 on pads (either padding side)
    weights = positions / positions.sum(-1, keepdim=True).clamp_min(1.0)
    plain = mask / mask.sum(-1, keepdim=True).clamp_min(1.0)
    weighted_rows, plain_rows = [], []
    for states in hidden_states[1:]:
        states = states.float()
        w, p = weights.to(states.device), plain.to(states.device)
        weighted_rows.append(torch.einsum("bs,bsh->bh", w, states).cpu())
        plain_rows.append(torch.einsum("bs,bsh->bh", p, states).cpu())
    return torch.stack(weighted_rows, 1), torch.stack(plain_rows, 1)


def mexa_hits(target: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """`[N, layers, H]` x2 -> `[N, layers]` bool: pair i's similarity beats its row and its column."""
    t = torch.nn.functional.normalize(target.double(), dim=-1).transpose(0, 1)  # [layers, N, H]
    a = torch.nn.functional.normalize(anchor.double(), dim=-1).transpose(0, 1)
    sim = t @ a.transpose(1, 2)  # [layers, N, N]: C[i, j] = cos(target_i, anchor_j)
    n = sim.shape[-1]
    diag = sim.diagonal(dim1=1, dim2=2)  # [layers, N]
    off = sim.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    beats = (diag > off.amax(2)) & (diag > off.amax(1))
    return beats.transpose(0, 1)


class HiddenTally(StreamingSums):
    """Streaming sums of MEXA hits and cosines per language (anchor = `langs[0]`) and layer."""

    def __init__(self, langs: list[str], num_layers: int):
        n = len(langs)
        self.langs = list(langs)
        self.hits = torch.zeros(n, num_layers, dtype=torch.float64)
        self.pooled_pairs = torch.zeros(n, dtype=torch.float64)  # pairs that were in a pool of >= 2
        self.cosine = torch.zeros(n, num_layers, dtype=torch.float64)
        self.pairs = torch.zeros(n, dtype=torch.float64)

    def add(self, weighted: torch.Tensor, plain: torch.Tensor, present: torch.Tensor) -> None:
        """weighted, plain `[n_langs, B, layers, H]`; present `[n_langs, B]` bool."""
        present = present.bool()
        for i in range(1, len(self.langs)):
            both = present[i] & present[0]
            count = int(both.sum())
            if count == 0:
                continue
            cos = torch.nn.functional.cosine_similarity(plain[i, both].double(), plain[0, both].double(), dim=-1)
            self.cosine[i] += cos.sum(0)
            self.pairs[i] += count
            if count >= 2:
                self.hits[i] += mexa_hits(weighted[i, both], weighted[0, both]).double().sum(0)
                self.pooled_pairs[i] += count

    SUMS = ("hits", "pooled_pairs", "cosine", "pairs")

    def finish(self) -> dict:
        mexa, cosine = {}, {}
        for i, lang in enumerate(self.langs[1:], start=1):
            if self.pooled_pairs[i] > 0:
                mexa[lang] = (self.hits[i] / self.pooled_pairs[i]).tolist()
            if self.pairs[i] > 0:
                cosine[lang] = (self.cosine[i] / self.pairs[i]).tolist()
        return {"mexa": mexa, "cosine": cosine, "pairs": {lang: int(self.pairs[i]) for i, lang in
                                                           enumerate(self.langs[1:], start=1)}}
