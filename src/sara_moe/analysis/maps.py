"""Routing maps as pure math over pooled or dispatched routing: streaming sums, then metrics.

    from sara_moe.analysis.maps import RoutingTally, expert_classes, specialisation, recommend_band
    tally = RoutingTally(["en", "sw", "yo"], num_layers=4, num_experts=8, topk=2)
    tally.add(pooled, present, dispatch_counts, tokens)   # one batch of groups (see `add`)
    tally.merge(other_rank_tally)                          # sums + counts add across processes
    maps = tally.finish()                                  # metrics per language and layer, maps

Memory is O(languages² × layers + languages × layers × experts) whatever the corpus size:
only sums and counts are kept. Languages are indexed in `langs` order; `langs[0]` is the anchor.

Per parallel pair (a group that has both languages), per MoE layer, on per-sequence mean
routing p_i (language) and q_i (anchor) — the routing source is chosen by the caller (dense
softmax probabilities, or the dispatched top-k weights renormalised to 1 per token):

- `js_pair_mean = mean_i JS(p_i, q_i)`: Bandarkar et al.'s `pairwise_mean_jsd`; on dense
  routing it is also SARA's training quantity (Dong et al.) to ~1e-7 (`divergence.js_exact`).
- `js_pair_norm = mean_i JS(p_i, q_i) / max(log E - (H(p_i) + H(q_i)) / 2, 1e-6)`: Bandarkar
  et al.'s entropy-normalised JS (`pairwise_mean_jsd(entropy_normalized=True)`).
- `js_corpus = JS(mean_i p_i, mean_i q_i)`: JS of the corpus-mean distributions (sara-moe's own
  summary; it ignores per-pair disagreement, so it is smaller than `js_pair_mean`).
- `topk_overlap = mean_i Jaccard(top-k experts of p_i, of q_i)` (sara-moe's own).
- `routing_entropy[lang] = mean_i H(p_i)`: Bandarkar et al.'s `analyze_routing_entropy`.
- `all_pairs`: `js_pair_mean` for every pair of languages (anchor included), per layer.

Expert × language map (dispatched slot counts, sara-moe's own definitions): with
`share[l, e]` = fraction of language l's dispatched slots that go to expert e, language l
*uses* expert e when `share[l, e] >= use_fraction / E` (default 0.2: a fifth of a uniform
share). An expert is `unused` (no language uses it), `exclusive:<lang>` (exactly one) or
`shared` (two or more). `specialisation = I(L; E) / H(L)` with languages weighted equally
(`P(l) = 1/n`, `P(e | l) = share[l, e]`): 0 when every language spreads its slots the same
way over the experts, 1 when the experts partition by language.
"""

from __future__ import annotations

import math

import torch

from sara_moe import divergence as D

BAND_RULE = ("the longest run of consecutive MoE layers, first and last MoE layer excluded (when there are 3 or "
             "more), whose js_pair_mean averaged over languages is at most min + 0.5 * (max - min) of that "
             "profile over the same layers; ties go to the run holding the minimum; a flat profile "
             "(max - min < 1e-6) falls back to the paper's band (7/48 <= i/num_layers < 35/48)")


class StreamingSums:
    """Tensors named in `SUMS` that add up across batches and processes (the tallies of `analyze`)."""

    SUMS: tuple = ()
    langs: list

    def state(self) -> dict:
        """The sums as tensors (summable across processes, storable as safetensors)."""
        return {name: getattr(self, name) for name in self.SUMS}

    def merge(self, other: "StreamingSums") -> None:
        if other.langs != self.langs:
            raise ValueError(f"cannot merge {type(self).__name__} of languages {other.langs} and {self.langs}")
        for name in self.SUMS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class RoutingTally(StreamingSums):
    """Sums and counts of one routing analysis; `add` batches, `merge` ranks, `finish` once."""

    SUMS = ("pair_js", "pair_js_norm", "pair_overlap", "pair_n", "mass_lang", "mass_anchor",
            "entropy", "sequences", "dispatch", "tokens")

    def __init__(self, langs: list[str], num_layers: int, num_experts: int, topk: int):
        n, L, E = len(langs), num_layers, num_experts
        self.langs, self.topk = list(langs), topk
        self.pair_js = torch.zeros(n, n, L, dtype=torch.float64)
        self.pair_js_norm = torch.zeros(n, n, L, dtype=torch.float64)
        self.pair_overlap = torch.zeros(n, n, L, dtype=torch.float64)
        self.pair_n = torch.zeros(n, n, dtype=torch.float64)
        self.mass_lang = torch.zeros(n, L, E, dtype=torch.float64)  # over groups that also have the anchor
        self.mass_anchor = torch.zeros(n, L, E, dtype=torch.float64)  # anchor rows paired with language l
        self.entropy = torch.zeros(n, L, dtype=torch.float64)
        self.sequences = torch.zeros(n, dtype=torch.float64)
        self.dispatch = torch.zeros(n, L, E, dtype=torch.float64)
        self.tokens = torch.zeros(n, dtype=torch.float64)

    def add(self, pooled: torch.Tensor, present: torch.Tensor, dispatch_counts: torch.Tensor | None = None,
            tokens: torch.Tensor | None = None) -> None:
        """One batch of B groups.

        pooled `[n_langs, B, L, E]` (any values where absent), present `[n_langs, B]` bool,
        dispatch_counts `[n_langs, L, E]` dispatched slots summed over the batch's tokens,
        tokens `[n_langs]` real tokens of the batch.
        """
        pooled = pooled.double()
        present = present.bool()
        n = len(self.langs)
        ent = D.entropy(pooled).double()  # [n, B, L]
        self.entropy += (ent * present[..., None]).sum(1)
        self.sequences += present.sum(1)
        for a in range(n):
            for b in range(a + 1, n):
                both = present[a] & present[b]
                if not bool(both.any()):
                    continue
                p, q = pooled[a, both], pooled[b, both]
                values = (D.js_exact(p, q).double().sum(0), D.entropy_normalized_js(p, q).double().sum(0),
                          D.topk_overlap(p, q, self.topk).double().sum(0))
                for total, value in zip((self.pair_js, self.pair_js_norm, self.pair_overlap), values):
                    total[a, b] += value
                    total[b, a] += value
                self.pair_n[a, b] += int(both.sum())
                self.pair_n[b, a] += int(both.sum())
                if a == 0:  # corpus means against the anchor, over the same groups
                    self.mass_lang[b] += q.sum(0)
                    self.mass_anchor[b] += p.sum(0)
        if dispatch_counts is not None:
            self.dispatch += dispatch_counts.double()
        if tokens is not None:
            self.tokens += tokens.double()

    def finish(self) -> dict:
        """metrics[name][lang] per layer (non-anchor languages) plus the maps; see the module docstring."""
        anchor, others = self.langs[0], self.langs[1:]
        metrics = {name: {} for name in ("js_pair_mean", "js_pair_norm", "js_corpus", "topk_overlap")}
        pairs = {}
        for i, lang in enumerate(others, start=1):
            n = float(self.pair_n[i, 0])
            pairs[lang] = int(n)
            if n == 0:
                continue
            metrics["js_pair_mean"][lang] = (self.pair_js[i, 0] / n).tolist()
            metrics["js_pair_norm"][lang] = (self.pair_js_norm[i, 0] / n).tolist()
            metrics["topk_overlap"][lang] = (self.pair_overlap[i, 0] / n).tolist()
            metrics["js_corpus"][lang] = D.js_exact(self.mass_lang[i] / n, self.mass_anchor[i] / n).double().tolist()
        n_pairs = self.pair_n.clamp_min(1)[..., None]
        all_pairs = (self.pair_js / n_pairs).permute(2, 0, 1)  # [L, n, n]
        entropy = {lang: (self.entropy[i] / max(float(self.sequences[i]), 1.0)).tolist()
                   for i, lang in enumerate(self.langs)}
        return {"anchor": anchor, "metrics": metrics, "num_pairs": pairs, "routing_entropy": entropy,
                "all_pairs_js": {"langs": self.langs, "js_pair_mean": all_pairs.tolist(),
                                 "num_pairs": self.pair_n.long().tolist()},
                "dispatch_counts": self.dispatch, "tokens": self.tokens.long().tolist()}


def dispatch_shares(counts: torch.Tensor) -> torch.Tensor:
    """`[n_langs, L, E]` counts -> each language's share of its dispatched slots per layer."""
    counts = counts.double()
    return counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)


def expert_classes(counts: torch.Tensor, langs: list[str], use_fraction: float = 0.2) -> list[list[str]]:
    """Per layer, per expert: "unused", "exclusive:<lang>" or "shared" (see the module docstring)."""
    shares = dispatch_shares(counts)  # [n, L, E]
    uses = shares >= use_fraction / counts.shape[-1]
    classes = []
    for layer in range(counts.shape[1]):
        row = []
        for expert in range(counts.shape[2]):
            users = [langs[i] for i in range(len(langs)) if bool(uses[i, layer, expert])]
            row.append("unused" if not users else f"exclusive:{users[0]}" if len(users) == 1 else "shared")
        classes.append(row)
    return classes


def specialisation(counts: torch.Tensor) -> list[float]:
    """Per layer I(L; E) / H(L) with equal language weights; 0 for a single language."""
    n = counts.shape[0]
    if n < 2:
        return [0.0] * counts.shape[1]
    shares = dispatch_shares(counts)  # P(e | l): [n, L, E]
    marginal = shares.mean(0)  # P(e) = sum_l P(l) P(e | l), P(l) = 1/n
    conditional = D.entropy(shares).double().mean(0)  # H(E | L)
    mutual = D.entropy(marginal).double() - conditional  # I(L; E) = H(E) - H(E | L)
    return (mutual / math.log(n)).clamp(0.0, 1.0).tolist()


def recommend_band(profile: list[float], moe_layers: list[int], paper_band: list[int]) -> list[int]:
    """The layer band `BAND_RULE` picks from a divergence profile (one value per MoE layer)."""
    if len(profile) != len(moe_layers) or not profile:
        raise ValueError(f"profile has {len(profile)} values for {len(moe_layers)} MoE layers")
    if len(profile) >= 3:  # every peer measures language-specific routing in the outermost layers
        profile, moe_layers = profile[1:-1], moe_layers[1:-1]
    low, high = min(profile), max(profile)
    if high - low < 1e-6:
        return list(paper_band)
    threshold = low + 0.5 * (high - low)
    runs, current = [], []
    for i, value in enumerate(profile):
        if value <= threshold:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    best = profile.index(low)
    runs.sort(key=lambda run: (-len(run), best not in run))
    return [moe_layers[i] for i in runs[0]]


def layer_bands(moe_layers: list[int], band: list[int]) -> dict:
    """early / middle (= the recommended band) / late MoE layers, for band-averaged maps."""
    lo, hi = min(band), max(band)
    bands = {"early": [x for x in moe_layers if x < lo], "middle": [x for x in moe_layers if lo <= x <= hi],
             "late": [x for x in moe_layers if x > hi]}
    return {name: layers for name, layers in bands.items() if layers}
