"""Which neurons serve one language, several, or all: the two published classifications.

    from sara_moe.analysis.neuron_classes import Thresholds, classify
    result = classify(probs, langs, Thresholds())     # probs [neurons, langs] activation probabilities
    result["lnp"]["type"]      # int8 per neuron: 1 specific, 2 related, 3 agnostic, 0 none
    result["lape"]["langs"]    # bool [neurons, langs]: the languages each neuron is assigned to

`probs[n, l]` is the activation probability of neuron n on language l's tokens (for an expert's
neuron: over the tokens dispatched to that expert). Both methods pool all neurons given (every
routed expert of every MoE layer together, as the papers pool all layers) when they take quantiles.

**LAPE** (Tang et al. 2024, "Language-Specific Neurons: The Key to Multilingual Capabilities in
Large Language Models", RUCAIBox/Language-Specific-Neurons `identify.py`): normalise each neuron's
probabilities over languages, take their entropy (LAPE); drop neurons with no probability above the
`lape_filter_rate` = 0.95 quantile of all probabilities (the paper's 95th percentile); keep the
`lape_top_rate` = 0.01 share of neurons with the lowest entropy (the paper's bottom 1%; its code
uses 0.05 for LLaMA-2-70B); assign a kept neuron to every language whose probability exceeds the
`lape_activation_bar_ratio` = 0.95 quantile (the code's `activation_bar_ratio`).

**LNP** (Zhang et al. 2025, "How does Alignment Enhance LLMs' Multilingual Capabilities? A Language
Neurons Perspective", NJUNLP/Language-Neurons-Alignment `identify.py`): score = entropy of the
normalised probabilities / log K − λ · max_l probs / m, m = (Σ_{k=1..K} 1/k)/K; the `lnp_top_rate`
share with the lowest score are *language neurons*, each assigned to the languages whose probability
exceeds the `lnp_activation_bar_ratio` = 0.95 quantile (the code's default `--bar`). `lnp_top_rate`
defaults to 0.01 (the released mask `0.01-0.109375`; the CLI default is 0.10) and `lnp_lambda` to 0.0
(the CLI default; the paper searches λ until no language neuron serves all languages). A language
neuron assigned to one language is **language-specific**, to several but not all **language-related**.
**Language-agnostic** neurons: the released code does not write them out; the rule used here is the
paper's definition read literally, a neuron whose probability exceeds that bar for every language.
LAPE's kept neurons are typed the same way by how many languages they are assigned to.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sara_moe.analysis import maps as M
from sara_moe.architectures import middle_band
from sara_moe.runtime import artifacts

TYPES = ("specific", "related", "agnostic")


@dataclass
class Thresholds:
    lape_top_rate: float = 0.01
    lape_filter_rate: float = 0.95
    lape_activation_bar_ratio: float = 0.95
    lnp_top_rate: float = 0.01
    lnp_lambda: float = 0.0
    lnp_activation_bar_ratio: float = 0.95


def quantile(values: torch.Tensor, ratio: float) -> float:
    """The papers' `kthvalue(round(n * ratio))` of the flattened values."""
    flat = values.reshape(-1).double()
    k = min(max(round(flat.numel() * ratio), 1), flat.numel())
    return float(flat.kthvalue(k).values)


def normalised_entropy(probs: torch.Tensor, empty_uniform: bool = False) -> torch.Tensor:
    """Entropy (natural log) of each row of `probs` normalised over languages. An all-zero row counts as
    all zeros (entropy 0, LAPE's code) or, with `empty_uniform`, as uniform (log K, LNP's `wrap_neuron`)."""
    total = probs.sum(-1, keepdim=True)
    empty = torch.full_like(probs, 1.0 / probs.shape[-1]) if empty_uniform else torch.zeros_like(probs)
    normed = torch.where(total > 0, probs / total.clamp_min(1e-30), empty)
    logs = torch.where(normed > 0, normed.clamp_min(1e-30).log(), torch.zeros_like(normed))
    return -(normed * logs).sum(-1)


def _lowest(score: torch.Tensor, rate: float) -> torch.Tensor:
    """bool [N]: the round(N * rate) lowest finite scores (ties: the lower index first)."""
    keep = torch.zeros(score.numel(), dtype=torch.bool)
    count = min(round(score.numel() * rate), int(torch.isfinite(score).sum()))
    if count > 0:
        order = torch.sort(score, stable=True).indices
        keep[order[:count]] = True
    return keep


def _types(assigned: torch.Tensor, selected: torch.Tensor, agnostic: torch.Tensor) -> torch.Tensor:
    """int8 [N]: 1 specific, 2 related, 3 agnostic, 0 none (the index into ("", *TYPES))."""
    width = assigned.sum(-1)
    code = torch.zeros(assigned.shape[0], dtype=torch.int8)
    code[agnostic] = 3
    code[selected & (width > 1) & (width < assigned.shape[-1])] = 2
    code[selected & (width == 1)] = 1
    return code


def classify(probs: torch.Tensor, langs: list[str], t: Thresholds) -> dict:
    """Both classifications of `probs [N, K]`: per method `type` (int8 [N], see `_types`), `langs` (bool [N, K]),
    the thresholds reached (`bars`)."""
    probs = probs.double()
    k = probs.shape[-1]
    if k < 2:
        raise ValueError(f"classification needs at least two languages; got {langs}")
    entropy = normalised_entropy(probs)
    # LAPE
    lape_filter = quantile(probs, t.lape_filter_rate)
    lape_bar = quantile(probs, t.lape_activation_bar_ratio)
    lape_score = torch.where((probs > lape_filter).any(-1), entropy, torch.full_like(entropy, math.inf))
    lape_kept = _lowest(lape_score, t.lape_top_rate)
    lape_langs = (probs > lape_bar) & lape_kept[:, None]
    lape_selected = lape_kept & lape_langs.any(-1)
    # LNP
    norm_max = sum(1 / i for i in range(1, k + 1)) / k
    lnp_score = normalised_entropy(probs, empty_uniform=True) / math.log(k) - probs.max(-1).values * t.lnp_lambda / norm_max
    lnp_bar = quantile(probs, t.lnp_activation_bar_ratio)
    lnp_kept = _lowest(lnp_score, t.lnp_top_rate)
    above = probs > lnp_bar
    agnostic = above.all(-1)
    lnp_langs = above & lnp_kept[:, None]
    return {
        "lape": {"type": _types(lape_langs, lape_selected, lape_selected & lape_langs.all(-1)),
                 "langs": lape_langs, "bars": {"filter": lape_filter, "activation": lape_bar}},
        "lnp": {"type": _types(lnp_langs, lnp_kept & lnp_langs.any(-1), agnostic),
                "langs": torch.where(agnostic[:, None], above, lnp_langs), "bars": {"activation": lnp_bar}},
    }


def type_counts(types: torch.Tensor, assigned: torch.Tensor, shape: tuple) -> dict:
    """{type: int [*shape, K]}: per cell (e.g. layer × expert) and language, the neurons of that type
    serving the language. `types`/`assigned` are flattened over `(*shape, neurons)`."""
    k = assigned.shape[-1]
    return {name: (assigned & (types == code)[:, None]).reshape(*shape, -1, k).sum(-2)
            for code, name in enumerate(TYPES, start=1)}


# ----------------------------------------------------------------------------- before and after


def _band_sums(result: dict, method: str, bands: dict) -> dict:
    """{type: {band: {lang: routed neurons of that type serving lang, summed over the band's layers}}}."""
    layers, langs = result["moe_layers"], result["langs"]
    counts = result["classification"][method]["counts"]["routed"]
    out = {}
    for name in TYPES:
        table = torch.tensor(counts[name]).sum(1)  # [layers, langs]
        out[name] = {band: {lang: int(table[[layers.index(x) for x in members], i].sum()) for i, lang in enumerate(langs)}
                     for band, members in bands.items()}
    return out


def _lists(result: dict, method: str, lang: str, types=("specific",)) -> set:
    found = result["classification"][method]["neurons"][lang]
    return {tuple(entry) for name in types for entry in found[name]}


def compare(base: dict, runs: dict, anchor: str = "en", bands: dict | None = None) -> dict:
    """How each type's counts move from `base` to each run (neurons.json dicts; `runs` = {label: dict}), per
    layer band, and how each language's language neurons overlap English's.

    `overlap_with_anchor[lang]` = |N(lang) ∩ N(anchor)| / |N(lang)| with N = a language's specific and
    related neurons (specific neurons alone never overlap: each serves one language); `kept_specific[lang]`
    = Jaccard of the language's specific neurons in the base and in the run (the same neurons or new ones)."""
    for label, run in runs.items():
        for key in ("langs", "moe_layers", "num_experts", "num_neurons"):
            if run.get(key) != base.get(key):
                raise ValueError(f"--compare {label}: its {key} {run.get(key)} differ from the base's {base.get(key)}; "
                                 "compare runs of the same model counted on the same languages")
    langs, layers = base["langs"], base["moe_layers"]
    if anchor not in langs:
        raise ValueError(f"--compare: anchor {anchor!r} is not among the counted languages {langs}")
    bands = bands or {"all": layers}

    def overlap(result, method):
        english = _lists(result, method, anchor, ("specific", "related"))
        out = {}
        for lang in langs:
            mine = _lists(result, method, lang, ("specific", "related"))
            out[lang] = len(mine & english) / len(mine) if mine else None
        return out

    methods = {}
    for method in ("lnp", "lape"):
        before = _band_sums(base, method, bands)
        entry = {"base": {"counts": before, "overlap_with_anchor": overlap(base, method)}, "runs": {}}
        for label, run in runs.items():
            after = _band_sums(run, method, bands)
            kept = {}
            for lang in langs:
                a, b = _lists(base, method, lang), _lists(run, method, lang)
                kept[lang] = len(a & b) / len(a | b) if a | b else None
            entry["runs"][label] = {
                "counts": after,
                "delta": {t: {band: {lang: after[t][band][lang] - before[t][band][lang] for lang in langs}
                              for band in bands} for t in TYPES},
                "overlap_with_anchor": overlap(run, method), "kept_specific": kept}
        methods[method] = entry
    return {"anchor": anchor, "langs": langs, "bands": bands, "methods": methods}


def _read_neurons(path, file_format: str) -> dict:
    file = Path(path) / "neurons.json" if Path(path).is_dir() else Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"--compare {path}: cannot read {file} ({err}); give `sara neurons` output folders") from None
    if not isinstance(data, dict) or data.get("format") != file_format:
        raise ValueError(f"--compare {file}: not a sara neurons file (format {file_format!r})")
    return data


def compare_runs(cfg, file_format: str) -> dict:
    """`sara neurons --compare BASE RUN ...` (`cfg` a NeuronsConfig): `compare` per layer band (early / middle =
    `architectures.middle_band` / late), written to neurons_compare.json beside its config."""
    if len(cfg.compare) < 2:
        raise ValueError("--compare needs a base and at least one run: --compare BASE RUN [RUN ...]")
    out = Path(cfg.output_dir) / "neurons_compare.json"
    artifacts.refuse_existing(out, cfg.overwrite)
    base, *runs = [_read_neurons(p, file_format) for p in cfg.compare]
    layers = base["moe_layers"]
    bands = M.layer_bands(layers, middle_band(base.get("num_layers", max(layers) + 1), layers))
    labels = [Path(p).name if Path(p).is_dir() else Path(p).parent.name for p in cfg.compare[1:]]
    result = compare(base, dict(zip(labels, runs)), cfg.anchor, bands)
    result.update(base=cfg.compare[0], runs=dict(zip(labels, cfg.compare[1:])))
    config = artifacts.config_dict(cfg)
    result["metadata"] = artifacts.run_metadata(config)
    artifacts.write_json(Path(cfg.output_dir) / "neurons_compare_config.json", config, overwrite=cfg.overwrite)
    artifacts.write_json(out, result, overwrite=cfg.overwrite)
    return result
