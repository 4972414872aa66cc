"""Cross-lingual routing analysis: where does a language stop using the anchor's experts?

    sara analyze --model PATH_OR_ID --data corpus.jsonl --output_dir runs/analysis [--anchor en] [--langs sw,yo]
        [--routing dense|dispatched] [--no_hidden] [--device_map auto] [--config analyze.yaml]

    from sara_moe.analysis.analyze import analyze
    result = analyze("runs/tiny", "examples/parallel.jsonl", "runs/analysis")

Every language's text of every parallel group (anchor included) runs once through the frozen
model. Texts are rendered exactly as `sara priors` and `sara train` render them
(`corpus.encode`: strings as-is with the tokenizer's special tokens; instruction
values through the chat template, or the plain template followed by EOS), so the analysed
routing is the routing that is trained on. Each MoE layer's routing is mean-pooled per sequence
over the real tokens; `--routing` picks what is pooled: `dense` router probabilities (default;
what SARA trains on) or `dispatched` — the weights of the experts the router actually selected,
renormalised to 1 per token (Bandarkar et al.'s "expert importance" from routing weights).

The metrics and maps, each with its formula and the paper it comes from, are documented in
`routing_maps` (js_pair_mean, js_pair_norm, js_corpus, topk_overlap, routing entropy, all-pairs
JS, expert × language dispatch counts with expert classes and specialisation) and
`hidden_alignment` (MEXA score and cosine per decoder layer); `metric_docs` in analysis.json
repeats them. `recommended_layers` follows `routing_maps.BAND_RULE`, written beside it.

Memory: the corpus is read in chunks (`--chunk-groups`), each sorted by length and batched;
only sums and counts are kept (O(languages² × layers + languages × layers × experts)), so
memory does not grow with the corpus. Padded rows are masked and positioned as if unpadded,
so batched results equal unbatched ones (MEXA's pool is the batch; see `hidden_alignment`).
Under a launcher (`torchrun --nproc_per_node N`, `accelerate launch`) the chunks are dealt
round-robin: rank r runs chunks r, r + N, ...; after each round of N chunks the ranks' chunk
sums are summed onto every rank (each comes from one rank, so bit for bit) and merged in corpus
order, so the outputs equal a one-process run's with the same `--chunk-groups` (which sets the
share: a corpus of one chunk runs on rank 0 alone). Rank 0 writes (`artifacts`); the others
return once the files exist.
Outputs (through `artifacts`, `analysis.json` last): analysis.json, analysis.csv,
analyze_config.json (the resolved `AnalyzeConfig`) and the plots of `analysis.plots`. An
existing analysis.json is refused unless `--overwrite`.

A model with several routers per decoder layer (JetMoE: attention heads and MLP experts) is
analysed at the aligned router site (`--router_site`, default the family's MLP-expert router)
and at each other site: `router_sites` in analysis.json lists every site with its divergence
profile, and `router_sites/<site>/` holds the full analysis of each other site (hidden-state
alignment, which does not depend on the router, only in the main one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from sara_moe.analysis import maps as M
from sara_moe.analysis import plots as P
from sara_moe.analysis.hidden_alignment import HiddenTally, pool_hidden
from sara_moe.architectures import (
    ROUTER_SITE_ATTR,
    experts_per_token,
    find_routers,
    middle_band,
    num_hidden_layers,
    router_site_names,
    set_router_site,
)
from sara_moe.data.corpus import CorpusError, encode, read_corpus
from sara_moe.routing import ROUTING_SOURCES, RouterRecorder, pool_sequences
from sara_moe.runtime import artifacts, distributed
from sara_moe.runtime.loading import DTYPES, load_model_and_tokenizer
from sara_moe.runtime.options import parse_config

METRIC_DOCS = {
    "js_pair_mean": "mean over parallel pairs i of JS(p_i, q_i) (Bandarkar et al. pairwise_mean_jsd; "
                    "SARA's training quantity on dense routing)",
    "js_pair_norm": "mean over pairs of JS(p_i, q_i) / max(log E - (H(p_i) + H(q_i))/2, 1e-6) "
                    "(Bandarkar et al. entropy-normalised JS)",
    "js_corpus": "JS(mean_i p_i, mean_i q_i) of the corpus-mean distributions (sara-moe's own)",
    "topk_overlap": "mean over pairs of the Jaccard index of the top-k expert sets (sara-moe's own)",
    "routing_entropy": "mean over sequences of H(p_i) (Bandarkar et al. analyze_routing_entropy)",
    "all_pairs_js": "js_pair_mean for every pair of languages, anchor included (Bandarkar et al. "
                    "pairwise_mean_jsd(from_english=False))",
    "experts": "dispatched slot counts per language; classes and IG(L;E)/H(L) as in routing_maps (sara-moe's own)",
    "hidden_alignment.mexa": "MEXA alignment score (Kargaran et al. 2024), pool = analysis batch",
    "hidden_alignment.cosine": "mean cosine of mean-pooled hidden states of parallel pairs (sara-moe's own)",
}


@dataclass
class AnalyzeConfig:
    """Options of `sara analyze` (flags, YAML keys and `analyze()` keywords are these names)."""

    model: str = field(metadata={"help": "model directory or hub id"})
    data: str = field(metadata={"help": "parallel corpus (JSONL or any datasets source)"})
    output_dir: str = field(metadata={"help": "folder for analysis.json, analysis.csv, the maps, analyze_config.json"})
    anchor: str = field(default="en", metadata={"help": "anchor language key of the corpus"})
    langs: list[str] | None = field(default=None, metadata={"help": "languages to analyse; none = all but the anchor"})
    batch_size: int = field(default=8, metadata={"help": "groups per forward (also MEXA's retrieval pool)"})
    max_length: int = field(default=512, metadata={"help": "tokens kept per sequence"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "dtype the weights are loaded in",
                                                    "choices": sorted(DTYPES)})
    topk: int | None = field(default=None, metadata={"help": "k for top-k overlap; none = experts per token"})
    routing: str = field(default="dense", metadata={
        "help": "pool dense router probabilities or the dispatched top-k weights renormalised",
        "choices": list(ROUTING_SOURCES)})
    hidden: bool = field(default=True, metadata={"help": "hidden-state alignment (MEXA, cosine); --no_hidden skips it"})
    device_map: str | None = field(default=None, metadata={"help": "e.g. auto: spread the model over the devices"})
    chunk_groups: int = field(default=1024, metadata={"help": "groups read, sorted and batched at a time"})
    use_fraction: float = field(default=0.2, metadata={
        "help": "a language uses an expert when it gets >= this fraction of a uniform share"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing analysis in output_dir"})
    router_site: str | None = field(default=None, metadata={
        "help": "router inside a decoder layer where it has several (JetMoE: mlp.router or "
                "self_attention.experts.router); none = the family default; every other site is reported too"})
    trust_remote_code: bool = False


def _survey(data, anchor: str, langs: list | None) -> tuple[list[str], int]:
    """One streaming pass: validates every group, returns (languages to analyse, number of groups)."""
    present, count = set(), 0
    for group in read_corpus(data, anchor=anchor):
        present.update(group.texts)
        count += 1
    if count == 0:
        raise CorpusError(f"{data}: no groups")
    available = sorted(present - {anchor})
    if langs is None:
        if not available:
            raise CorpusError(f"{data}: corpus has no language besides the anchor {anchor!r}")
        return available, count
    unknown = [lang for lang in langs if lang not in available]
    if unknown:
        raise CorpusError(f"--langs {','.join(unknown)}: not in the corpus (languages besides the anchor: "
                          f"{','.join(available) or 'none'})")
    return list(langs), count


def _chunks(data, anchor: str, size: int):
    chunk = []
    for group in read_corpus(data, anchor=anchor):
        chunk.append(group)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Runner:
    """Runs one language's texts of a batch and pools routing, dispatch counts and hidden states."""

    def __init__(self, net, tokenizer, routing: str, hidden: bool):
        self.net, self.routing, self.hidden = net, routing, hidden
        self.recorder = RouterRecorder(net, keep_topk=True)
        self.tokenizer = tokenizer  # pads on its own padding_side

    @torch.no_grad()
    def __call__(self, sequences: list[list[int]]):
        extra = {"output_hidden_states": True} if self.hidden else {}
        batch = pool_sequences(self.net, self.recorder, sequences, self.tokenizer, self.routing, **extra)
        hidden = pool_hidden(batch.outputs.hidden_states, batch.attention_mask) if self.hidden else None
        return batch.pooled, batch.counts, batch.tokens, hidden

    def batch(self, encoded: list[dict], langs: list[str]) -> dict:
        """One forward per language over a batch of groups (`encoded[row][lang]` = token ids):
        pooled `[langs, B, L, E]`, present `[langs, B]`, counts `[langs, L, E]`, tokens `[langs]`
        and, with hidden, the pooled states `weighted` / `plain` `[langs, B, layers, H]`."""
        out = {"present": torch.zeros(len(langs), len(encoded), dtype=torch.bool), "tokens": torch.zeros(len(langs))}
        for li, lang in enumerate(langs):
            rows = [r for r, ids in enumerate(encoded) if lang in ids]
            if not rows:
                continue
            pooled, counts, tokens, hidden = self([encoded[r][lang] for r in rows])
            if "pooled" not in out:
                out["pooled"] = torch.zeros(len(langs), len(encoded), *pooled.shape[1:])
                out["counts"] = torch.zeros(len(langs), *counts.shape)
                if hidden is not None:
                    out["weighted"] = torch.zeros(len(langs), len(encoded), *hidden[0].shape[1:])
                    out["plain"] = torch.zeros_like(out["weighted"])
            out["pooled"][li, rows], out["present"][li, rows] = pooled, True
            out["counts"][li], out["tokens"][li] = counts, tokens
            if hidden is not None:
                out["weighted"][li, rows], out["plain"][li, rows] = hidden
        return out


def analyze(model, data, output_dir, anchor: str = "en", langs: list | None = None, batch_size: int = 8,
            max_length: int = 512, device: str = "auto", dtype: str = "float32", topk: int | None = None,
            overwrite: bool = False, trust_remote_code: bool = False, *, routing: str = "dense",
            hidden: bool = True, device_map: str | None = None, chunk_groups: int = 1024,
            use_fraction: float = 0.2, router_site: str | None = None, tokenizer=None, progress: bool = True,
            plots: bool = True) -> dict:
    """Run the routing analysis and write its outputs; returns the analysis.json dict.

    `model` is a path / hub id, or a loaded model (e.g. with `device_map="auto"`) plus `tokenizer`.
    """
    config = AnalyzeConfig(model=str(getattr(model, "name_or_path", model)), data=str(data), output_dir=str(output_dir),
                           anchor=anchor, langs=langs, batch_size=batch_size, max_length=max_length, device=device,
                           dtype=dtype, topk=topk, routing=routing, hidden=hidden, device_map=device_map,
                           chunk_groups=chunk_groups, use_fraction=use_fraction, overwrite=overwrite,
                           router_site=router_site, trust_remote_code=trust_remote_code)
    for name, value in (("batch-size", batch_size), ("max-length", max_length), ("topk", topk or 1),
                        ("chunk-groups", chunk_groups)):
        if value < 1:
            raise ValueError(f"--{name} {value}: must be a positive integer")
    if routing not in ROUTING_SOURCES:
        raise ValueError(f"--routing {routing!r}: choose one of {', '.join(ROUTING_SOURCES)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    artifacts.claim(output_dir, "analysis.json", overwrite)  # before the model runs
    langs, num_groups = _survey(data, anchor, langs)
    all_langs = [anchor, *langs]
    place = str(distributed.device(device))  # under a launcher: joins its process group, this rank's device
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        net, tokenizer = load_model_and_tokenizer(str(model), dtype, place, trust_remote_code, device_map=device_map)
    elif tokenizer is None:
        raise ValueError("analyze: pass tokenizer= with a loaded model")
    else:
        net = model.eval()
    router_site = router_site if router_site is not None else getattr(net, ROUTER_SITE_ATTR, None)
    set_router_site(net, router_site)  # a site the model lacks is refused here, before any forward
    result = _analyze_site(net, tokenizer, config, data, anchor, all_langs, num_groups, hidden, progress)
    names = router_site_names(net)
    others = {}
    if len(names) > 1:  # report every router site; the aligned one is the main analysis
        for site in names:
            if site != result["router_site"]:
                set_router_site(net, site)
                others[site] = _analyze_site(net, tokenizer, config, data, anchor, all_langs, num_groups, False,
                                             progress)
        set_router_site(net, router_site)
        result["router_sites"] = {site: {"folder": f"router_sites/{site}" if site in others else ".",
                                         "divergence_profile": r["divergence_profile"],
                                         "recommended_layers": r["recommended_layers"]}
                                  for site, r in [(result["router_site"], result), *others.items()]}
    result["metadata"] = artifacts.run_metadata(asdict(config), device=device)
    for r in others.values():
        r["metadata"] = result["metadata"]
    P.write_analysis(output_dir, result, asdict(config), overwrite, plots, others)  # rank 0 writes (artifacts)
    artifacts.wait_for_main()
    return result


def _analyze_site(net, tokenizer, config: AnalyzeConfig, data, anchor, all_langs, num_groups, hidden: bool,
                  progress: bool) -> dict:
    """The analysis (`_result`) of the routers at the model's current router site."""
    sites = find_routers(net)
    layers = [s.layer for s in sites]
    depth = num_hidden_layers(net)
    k = config.topk or experts_per_token(net)
    max_length, batch_size, chunk_groups = config.max_length, config.batch_size, config.chunk_groups
    runner = _Runner(net, tokenizer, config.routing, hidden)
    world, me = distributed.world_size(), distributed.rank()
    num_chunks = -(-num_groups // chunk_groups)
    mine = sum(min(chunk_groups, num_groups - i * chunk_groups) for i in range(me, num_chunks, world))
    where = f" {sites[0].site}" if len(router_site_names(net)) > 1 else ""
    bar = tqdm(total=mine, desc=f"sara analyze{where}" + (f" (rank {me})" if world > 1 else ""), unit="group",
               disable=not progress)
    tally = hidden_tally = None  # totals: chunk sums merged in corpus order, whichever rank computed them
    chunks = _chunks(data, anchor, chunk_groups)
    for first in range(0, num_chunks, world):  # a round: chunk first + r is rank r's
        round_chunks = [next(chunks) for _ in range(min(world, num_chunks - first))]
        sums = (_chunk_sums(runner, round_chunks[me], tokenizer, all_langs, anchor, max_length, batch_size,
                            len(layers), k, depth if hidden else None, bar) if me < len(round_chunks) else None)
        for part, part_hidden in _exchange(sums, len(round_chunks), all_langs, len(layers), k,
                                           depth if hidden else None):
            if tally is None:
                tally, hidden_tally = part, part_hidden
            else:
                tally.merge(part)
                if hidden:
                    hidden_tally.merge(part_hidden)
    bar.close()
    result = _result(tally, hidden_tally, config, net, sites, layers, depth, k, num_groups)
    result["router_site"] = sites[0].site
    return result


def _chunk_sums(runner, chunk, tokenizer, all_langs, anchor, max_length, batch_size, num_layers, k, depth, bar):
    """One chunk of groups, sorted by anchor length and batched: its (RoutingTally, HiddenTally or None)."""
    encoded = [{lang: encode(g.texts[lang], tokenizer, max_length)[0] for lang in all_langs if lang in g.texts}
               for g in chunk]
    order = sorted(range(len(chunk)), key=lambda i: len(encoded[i][anchor]))
    tally = hidden_tally = None
    for start in range(0, len(order), batch_size):
        batch = runner.batch([encoded[i] for i in order[start:start + batch_size]], all_langs)
        if tally is None:
            tally = M.RoutingTally(all_langs, num_layers, batch["pooled"].shape[-1], k)
            hidden_tally = HiddenTally(all_langs, depth) if depth is not None else None
        tally.add(batch["pooled"], batch["present"], batch["counts"], batch["tokens"])
        if hidden_tally is not None:
            hidden_tally.add(batch["weighted"], batch["plain"], batch["present"])
        bar.update(len(batch["present"][0]))
    return tally, hidden_tally


def _exchange(sums, count: int, all_langs, num_layers: int, k: int, depth: int | None) -> list[tuple]:
    """Every rank's chunk sums of one round, in rank (= corpus) order, on every rank.

    Each rank fills its own row of a zero table and the rows are summed over ranks; a row
    comes from one rank only, so the sums arrive bit for bit (x + 0 == x) and the totals
    merge in the order one process merges them."""
    if distributed.world_size() == 1:
        return [sums]
    # rank 0 holds a chunk in every round: its expert count sizes the table on every rank
    experts = int(distributed.from_main(torch.tensor(sums[0].dispatch.shape[-1] if sums else 0)))

    def empty():
        return (M.RoutingTally(all_langs, num_layers, experts, k),
                HiddenTally(all_langs, depth) if depth is not None else None)

    def parts(pair):
        tallies = [t for t in pair if t is not None]
        return [(t, name) for t in tallies for name in t.SUMS]

    template = parts(empty())
    sizes = [getattr(t, name).numel() for t, name in template]
    table = torch.zeros(distributed.world_size(), sum(sizes), dtype=torch.float64)
    if sums is not None:
        table[distributed.rank()] = torch.cat([getattr(t, name).double().reshape(-1) for t, name in parts(sums)])
    table = distributed.all_sum(table)
    out = []
    for row in table[:count]:
        pair = empty()
        for (t, name), piece in zip(parts(pair), row.split(sizes)):
            setattr(t, name, piece.reshape(getattr(t, name).shape).clone())
        out.append(pair)
    return out


def _result(tally, hidden_tally, config: AnalyzeConfig, net, sites, layers, depth, k, num_groups) -> dict:
    summary = tally.finish()
    missing = [lang for lang in config.langs or summary["num_pairs"] if summary["num_pairs"].get(lang, 0) == 0]
    if missing:
        raise CorpusError(f"{config.data}: no group has both {config.anchor!r} and {missing[0]!r}")
    langs = [lang for lang in tally.langs[1:]]
    metrics = summary["metrics"]
    metrics["routing_entropy"] = {lang: summary["routing_entropy"][lang] for lang in langs}
    profile = [sum(metrics["js_pair_mean"][lang][i] for lang in langs) / len(langs) for i in range(len(layers))]
    paper_band = middle_band(depth, layers)
    band = M.recommend_band(profile, layers, paper_band)
    bands = M.layer_bands(layers, band)
    all_pairs = summary["all_pairs_js"]
    by_band = {name: [[sum(all_pairs["js_pair_mean"][layers.index(x)][a][b] for x in members) / len(members)
                       for b in range(len(tally.langs))] for a in range(len(tally.langs))]
               for name, members in bands.items()}
    counts = summary["dispatch_counts"]
    classes = M.expert_classes(counts, tally.langs, config.use_fraction)
    class_summary = [{"shared": row.count("shared"), "unused": row.count("unused"),
                      "exclusive": {lang: row.count(f"exclusive:{lang}") for lang in tally.langs}} for row in classes]
    result = {
        "model": config.model, "data": config.data, "anchor": config.anchor, "langs": langs,
        "moe_layers": layers, "num_layers": depth, "num_experts": int(counts.shape[-1]), "topk": k,
        "scoring": sites[0].scoring, "routing": config.routing, "num_examples": num_groups,
        "num_pairs": summary["num_pairs"], "metrics": metrics, "metric_docs": METRIC_DOCS,
        "routing_entropy": summary["routing_entropy"],
        "all_pairs_js": {**all_pairs, "bands": bands, "by_band": by_band},
        "experts": {"langs": tally.langs, "counts": counts.long().tolist(), "tokens": summary["tokens"],
                    "classes": classes, "summary": class_summary, "use_fraction": config.use_fraction,
                    "specialisation": M.specialisation(counts)},
        "recommended_layers": band, "recommended_rule": M.BAND_RULE,
        "divergence_profile": profile, "paper_band": paper_band,
        "ln2": math.log(2),
    }
    if hidden_tally is not None:
        result["hidden_alignment"] = {"layers": list(range(depth)), **hidden_tally.finish()}
    return result


def analyze_cli(argv=None) -> int:
    cfg = parse_config(AnalyzeConfig, argv, "sara analyze", "Cross-lingual routing divergence per MoE layer.")
    result = analyze(**asdict(cfg))
    print(f"analysis of {len(result['langs'])} language(s) x {len(result['moe_layers'])} MoE layers "
          f"written to {cfg.output_dir}; recommended layers {result['recommended_layers']} "
          f"({result['recommended_rule'].split(';')[0]})")
    return 0
