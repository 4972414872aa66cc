"""Language neurons in the testbed study: do SARA and SFT change the clone's language-specific neurons differently?

    from sara_moe.experiment import neuron_view
    found = neuron_view.count(world / "base", world / "testbed" / "probe.jsonl")   # one model's summary
    neuron_view.attach(record, model_dir, probe, base=base_record["neurons"])     # read back, counted or missing
    summary["neurons"] = neuron_view.neuron_block(summary["neuron_runs"], align_layers=[1, 2])
    lines = neuron_view.markdown(summary["neurons"])                              # report.md's "Language neurons"

On with `ExperimentConfig.neurons` (`sara demo --full`), beside the arms: every run's model (the base
and each fine-tuned arm, before its weights are deleted) reads the world's parallel probe sentences
(`probe.jsonl`) in English and the clone through `analysis.neurons` (its counter and LNP / LAPE
classification; thresholds `ExperimentConfig.neuron_thresholds`, default the papers'). The record
keeps per method and MoE layer the clone-specific, English-specific, related (empty by definition with
two languages) and agnostic neurons, the specific neurons themselves (`[layer, expert, neuron]`), and
`vs_base`: the base's clone-specific neurons still clone-specific (`kept`), clone-specific neurons the
base lacked (`new`), and the run's clone-specific neurons against the base's English-specific ones
(`en_shared` / `en_union`, a Jaccard overlap; in one model the two are disjoint by definition). The
steer arm (SFT weights, steered only at inference) and a run cached without a count whose weights are
gone are `missing`, never filled in. `neuron_block`: per world kind, arm and band (the recipe's
`align_layers`, and outside), mean and 95% bootstrap CI over (world seed, FT seed); SARA vs SFT paired
over matched (world seed, FT seed) with `paired_tests.paired_bootstrap`; `markdown` words them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sara_moe.evaluation.paired_tests import paired_bootstrap
from sara_moe.experiment.design import CLONE
from sara_moe.runtime import artifacts

LANGS = ("en", CLONE)
METHODS = ("lnp", "lape")
METRICS = ("clone_specific", "kept_share", "new", "en_overlap")
ALPHA = 0.05
STEER = "steer arm: the SFT weights, steered only at inference (its neurons are SFT's)"
GONE = ("cached without a neuron count (at these thresholds) and its fine-tuned weights are deleted; delete its "
        "result.json and rerun with keep_models to count it")


def thresholds(given: dict | None) -> dict:
    """The classification thresholds used: `analysis.neuron_classes.Thresholds` (the papers' defaults) updated
    by `given` (`ExperimentConfig.neuron_thresholds`)."""
    from dataclasses import asdict

    from sara_moe.analysis.neuron_classes import Thresholds

    unknown = sorted(set(given or {}) - set(asdict(Thresholds())))
    if unknown:
        raise ValueError(f"neuron_thresholds: unknown key {unknown[0]!r}; the keys are {sorted(asdict(Thresholds()))}")
    return {**asdict(Thresholds()), **(given or {})}


def count(model_dir, probe, given: dict | None = None) -> dict:
    """One model's summary on `probe`'s English and clone texts (`given`: thresholds, see `thresholds`)."""
    from sara_moe.analysis import neurons as N
    from sara_moe.runtime.loading import load_model_and_tokenizer

    started = time.time()
    used = thresholds(given)
    cfg = N.NeuronsConfig(output_dir="", model=str(model_dir), data=str(probe), langs=list(LANGS), device="cpu", **used)
    langs, _ = N.survey_langs(cfg.data, cfg.langs)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.dtype, cfg.device)
    counter, sites, tensors, tokens = N.count_neurons(model.eval(), tokenizer, cfg, langs)
    layers = [s.layer for s in counter.routed]
    classes = N.classify_counts(tensors, sites, langs, cfg)
    methods = {}
    for method in METHODS:
        found = classes[method]["neurons"]

        def cells(kind, of=langs):  # distinct routed neurons of `kind` serving any language of `of`
            return sorted({(layer, e, n) for lang in of for layer, k, e, n in found[lang][kind] if k == "routed"})

        def per_layer(neurons):
            return [sum(c[0] == layer for c in neurons) for layer in layers]

        clone, english = cells("specific", [CLONE]), cells("specific", ["en"])
        methods[method] = {
            "per_layer": {"clone_specific": per_layer(clone), "en_specific": per_layer(english),
                          "related": per_layer(cells("related")), "agnostic": per_layer(cells("agnostic"))},
            "clone_specific": [list(c) for c in clone], "en_specific": [list(c) for c in english]}
    return {"data": Path(probe).name, "langs": langs, "moe_layers": layers, "tokens": dict(zip(langs, tokens.tolist())),
            "thresholds": used, "seconds": round(time.time() - started, 2), "methods": methods}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def versus(found: dict, base: dict) -> dict:
    """`vs_base` per method: per MoE layer base clone-specific, kept, new, en_shared, en_union; overall shares."""
    layers, out = found["moe_layers"], {}
    for method in METHODS:
        mine, before, english = ({tuple(c) for c in m["methods"][method][key]}
                                 for m, key in ((found, "clone_specific"), (base, "clone_specific"), (base, "en_specific")))
        per = {name: [sum(c[0] == layer for c in cells) for layer in layers] for name, cells in
               (("base_clone_specific", before), ("kept", before & mine), ("new", mine - before),
                ("en_shared", mine & english), ("en_union", mine | english))}
        out[method] = {**per, "kept_share": _ratio(sum(per["kept"]), sum(per["base_clone_specific"])),
                       "en_overlap": _ratio(sum(per["en_shared"]), sum(per["en_union"]))}
    return out


def attach(record: dict, model_dir, probe, base: dict | None = None, result_file=None, given: dict | None = None) -> dict:
    """Give `record["neurons"]`: its read-back summary (counted with the same thresholds), a count now (weights
    still in `model_dir`) or `missing`; plus `vs_base` against `base` (none: the record is the base). A count
    made now of a run already on disk (`result_file`) is written into it."""
    found, counted = record.get("neurons"), False
    if not found or "missing" in found or found["thresholds"] != thresholds(given):
        counted = record["arm"] != "steer" and any(Path(model_dir).glob("*.safetensors"))
        found = count(model_dir, probe, given) if counted else {
            "missing": STEER if record["arm"] == "steer" else GONE}
    if "missing" not in found and "missing" not in (base or {}):
        found["vs_base"] = versus(found, base or found)
    if counted and result_file is not None:
        artifacts.write_json(result_file, {**json.loads(Path(result_file).read_text()), "neurons": found})
    record["neurons"] = found
    return found


def row(world: str, world_seed: int, record: dict) -> dict:
    """The summary.json row of one run: its per-layer counts and vs_base (the neuron lists stay in result.json)."""
    found = record.get("neurons") or {"missing": "not counted"}
    compact = {k: v for k, v in found.items() if k != "methods"}
    if "methods" in found:
        compact["per_layer"] = {m: v["per_layer"] for m, v in found["methods"].items()}
    return {"world": world, "world_seed": world_seed, "arm": record["arm"], "ft_seed": record["ft_seed"], **compact}


def metrics(r: dict, method: str, band: list) -> dict:
    """One run's numbers over the MoE layers in `band` (kept share and overlap: pooled over the band's layers)."""
    def total(values):
        return sum(v for v, layer in zip(values, r["moe_layers"]) if layer in band)

    out = {"clone_specific": total(r["per_layer"][method]["clone_specific"])}
    vs = r.get("vs_base", {}).get(method)
    if vs:
        out.update(kept_share=_ratio(total(vs["kept"]), total(vs["base_clone_specific"])), new=total(vs["new"]),
                   en_overlap=_ratio(total(vs["en_shared"]), total(vs["en_union"])))
    return out


def _mean_ci(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    test = paired_bootstrap([0.0] * len(values), values)
    return {"mean": test["diff"], "ci_low": test["ci_low"], "ci_high": test["ci_high"], "n": len(values)}


def neuron_block(rows: list[dict], align_layers: list) -> dict:
    """summary.json's `neurons`: per world kind, arm, method, band and metric mean + CI; SARA vs SFT paired."""
    measured = [r for r in rows if "missing" not in r]
    seconds = [r["seconds"] for r in measured]
    block = {"align_layers": list(align_layers), "langs": list(LANGS), "methods": list(METHODS),
             "thresholds": measured[0]["thresholds"] if measured else None,
             "data": sorted({r["data"] for r in measured}), "counted": len(measured),
             "seconds_per_run": {"mean": sum(seconds) / len(seconds), "max": max(seconds)} if seconds else None,
             "related_total": sum(sum(r["per_layer"][m]["related"]) for r in measured for m in METHODS),
             "missing": [{k: r[k] for k in ("world", "world_seed", "arm", "ft_seed", "missing")}
                         for r in rows if "missing" in r], "worlds": {}}
    for world in dict.fromkeys(r["world"] for r in measured):
        mine = [r for r in measured if r["world"] == world]
        layers = mine[0]["moe_layers"]
        bands = {name: members for name, members in (("aligned", [x for x in layers if x in align_layers]),
                                                     ("outside", [x for x in layers if x not in align_layers])) if members}
        values = {(r["arm"], r["world_seed"], r["ft_seed"]): {m: {b: metrics(r, m, members) for b, members in bands.items()}
                                                              for m in METHODS} for r in mine}
        arms = {arm: {m: {b: {x: _mean_ci([v[m][b].get(x) for key, v in values.items() if key[0] == arm])
                              for x in METRICS} for b in bands} for m in METHODS}
                for arm in dict.fromkeys(r["arm"] for r in mine)}
        entry = {"layers": layers, "bands": bands, "arms": arms}
        if "sara" in arms and "sft" in arms:
            entry["sara_vs_sft"] = {m: {b: {x: _paired(values, m, b, x) for x in METRICS} for b in bands} for m in METHODS}
        block["worlds"][world] = entry
    return block


def _paired(values: dict, method: str, band: str, metric: str) -> dict:
    pairs = sorted({key[1:] for key in values if key[0] == "sara"} & {key[1:] for key in values if key[0] == "sft"})
    got = [(values[("sft", *k)][method][band].get(metric), values[("sara", *k)][method][band].get(metric)) for k in pairs]
    got = [(a, b) for a, b in got if a is not None and b is not None]
    if not got:
        return {"n_pairs": 0}
    test = paired_bootstrap([a for a, _ in got], [b for _, b in got])
    if len(got) < 2:  # one pair: the bootstrap has nothing to resample, so no CI and no p
        test.update(ci_low=None, ci_high=None, p=None)
    return {"sara": sum(b for _, b in got) / len(got), "sft": sum(a for a, _ in got) / len(got), "diff": test["diff"],
            "ci_low": test["ci_low"], "ci_high": test["ci_high"], "p": test["p"], "n_pairs": len(got)}


# ----------------------------------------------------------------------------- words

FORMATS = {"clone_specific": lambda v: f"{v:.1f}", "new": lambda v: f"{v:.1f}",
           "kept_share": lambda v: f"{100 * v:.1f}%", "en_overlap": lambda v: f"{v:.3f}"}
DIFFS = {"clone_specific": lambda v: f"{v:+.1f}", "new": lambda v: f"{v:+.1f}",
         "kept_share": lambda v: f"{100 * v:+.1f} points", "en_overlap": lambda v: f"{v:+.3f}"}
PHRASES = {"kept_share": "SARA kept {sara} of the base model's clone-specific neurons, SFT {sft}",
           "clone_specific": "SARA left {sara} clone-specific neurons, SFT {sft}",
           "new": "SARA has {sara} clone-specific neurons the base model did not have, SFT {sft}",
           "en_overlap": "the overlap (Jaccard) of clone-specific neurons with the base model's English-specific "
                         "ones is {sara} under SARA, {sft} under SFT"}


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def sentence(method: str, band: list, metric: str, c: dict) -> str:
    """One SARA-vs-SFT statement; the verdict follows the sign and the p-value."""
    fmt, diff = FORMATS[metric], DIFFS[metric]
    head = f"{method.upper()}, layers {', '.join(map(str, band))}: " + PHRASES[metric].format(sara=fmt(c["sara"]),
                                                                                                sft=fmt(c["sft"]))
    if c["p"] is None:
        return head + f" (SARA − SFT {diff(c['diff'])} on a single (world seed, FT seed) pair: no test)."
    verdict = ("higher under SARA" if c["diff"] > 0 else "lower under SARA") if c["p"] < ALPHA else "no significant difference"
    return head + (f" (SARA − SFT {diff(c['diff'])}, 95% CI {diff(c['ci_low'])} to {diff(c['ci_high'])}, "
                   f"{_p(c['p'])} over {c['n_pairs']} (world seed, FT seed) pairs: {verdict}).")


def _cell(metric: str, s: dict) -> str:
    if not s.get("n"):
        return "—"
    fmt = FORMATS[metric]
    return f"{fmt(s['mean'])} [{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]"


def markdown(block: dict) -> list[str]:
    """The report's "Language neurons" section, every number from `block`."""
    seconds = block["seconds_per_run"]
    lines = ["## Language neurons", "",
             f"Neurons of every MoE expert counted on {', '.join(block['data']) or 'no data'} ({' and '.join(block['langs'])}"
             f" texts) and classified with {' and '.join(m.upper() for m in block['methods'])} (`analysis.neurons`): "
             f"{block['counted']} runs counted" + (f", {seconds['mean']:.1f} s per run on average (at most "
                                                   f"{seconds['max']:.1f} s)" if seconds else "")
             + f", {len(block['missing'])} missing. Kept share: the base model's clone-specific neurons that stay "
               f"clone-specific; new: clone-specific neurons the base did not have; overlap: Jaccard with the base "
               f"model's English-specific neurons. Language-related neurons over all runs: {block['related_total']}"
             + (" (with two languages a language neuron serves one language or both)." if len(block["langs"]) == 2 else "."),
             ""]
    lines += [f"- Missing: {m['world']} seed {m['world_seed']} {m['arm']} ft{m['ft_seed']}: {m['missing']}."
              for m in block["missing"]] + ([""] if block["missing"] else [])
    for world, entry in block["worlds"].items():
        lines += [f"### World kind `{world}`", ""]
        for method, bands in entry.get("sara_vs_sft", {}).items():
            lines += [f"- {sentence(method, entry['bands'][b], x, c)}" for b, per in bands.items()
                      for x, c in per.items() if c["n_pairs"] and x != "new"]
        lines += ["", "| method | arm | layers | clone-specific | kept | new | overlap with English |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {method.upper()} | {arm} | {', '.join(map(str, entry['bands'][b]))} | "
                  + " | ".join(_cell(x, per[x]) for x in METRICS) + " |"
                  for arm, methods in entry["arms"].items() for method, bands in methods.items() for b, per in bands.items()]
        lines.append("")
    return lines
