"""Cost of `sara analyze` over plain no-grad forwards of the same tokens (target from issue 13: <= 1.2).

    python benchmarks/bench_analyze.py [--groups 1000] [--langs 5] [--hidden 128] [--experts 16] [--batch 16]

Builds a random Qwen3-MoE and a synthetic parallel corpus (`--groups` groups x `--langs`
languages, anchor included; no download), cuts it into `--slices` consecutive slices and, slice
by slice (so that load from other processes drifts over both alike), times:

- plain: the same batches `analyze` runs (each chunk sorted by anchor length, one forward per
  language per batch, same padding) through `model(input_ids, attention_mask)` under no_grad;
- analysis: `analyze(model, ...)` end to end — reading and tokenizing the corpus, every metric
  and map (dense routing, dispatched counts, hidden-state alignment), plots and files.

Reports summed seconds and analysis / plain twice: without writing plots and files
(`plots.write_analysis`, timed separately; its cost does not grow with the corpus), and
end to end for one analysis of the whole corpus (the slices' analysis time minus their writing,
plus one writing). Tokenizing counts against the analysis only. Results go to stdout; copy them
to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sara_moe.analysis import plots
from sara_moe.analysis.analyze import analyze
from sara_moe.architectures.tiny import build_tiny_model, build_tokenizer
from sara_moe.data.corpus import encode, read_corpus
from sara_moe.runtime.loading import pad_batch

WORDS = ("the cat river market doctor water children school rice evening bus city teacher question board "
         "paka maji mto soko daktari watoto shule wali jioni basi mji mwalimu swali ubao gato agua río "
         "chat rivière marché médecin eau enfants école riz soir bus ville professeur").split()
LANGS = ["en", "sw", "es", "fr", "yo", "ha", "te", "bn"]


def make_corpus(path: Path, groups: int, langs: list[str], seed: int = 0) -> None:
    rng = torch.Generator().manual_seed(seed)
    with open(path, "w") as fh:
        for g in range(groups):
            row = {"id": f"g{g}"}
            for lang in langs:
                n = int(torch.randint(12, 30, (1,), generator=rng))
                row[lang] = " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=rng))
            fh.write(json.dumps(row) + "\n")


@torch.no_grad()
def plain_forwards(model, tokenizer, corpus: Path, langs: list[str], batch: int, chunk: int = 1024) -> tuple[float, int]:
    """Seconds for the analysis' batches through a plain forward (tokenizing excluded), and tokens."""
    groups = list(read_corpus(corpus, anchor=langs[0]))
    seconds, tokens = 0.0, 0
    for lo in range(0, len(groups), chunk):
        encoded = [{lang: encode(g.texts[lang], tokenizer, 512)[0] for lang in langs}
                   for g in groups[lo:lo + chunk]]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][langs[0]]))
        for start in range(0, len(order), batch):
            for lang in langs:
                ids, mask = pad_batch(tokenizer, [encoded[i][lang] for i in order[start:start + batch]])
                t0 = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                seconds += time.perf_counter() - t0
                tokens += int(mask.sum())
    return seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--langs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--slices", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    langs = LANGS[:args.langs]
    work = Path(tempfile.mkdtemp(prefix="bench_analyze_"))
    corpus = work / "corpus.jsonl"
    make_corpus(corpus, args.groups, langs)
    tokenizer = build_tokenizer(WORDS * 4, vocab_size=400)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = build_tiny_model("qwen3_moe", vocab_size=len(tokenizer), hidden_size=args.hidden,
                             num_hidden_layers=args.layers, num_experts=args.experts, num_experts_per_tok=2,
                             intermediate_size=2 * args.hidden, moe_intermediate_size=args.hidden)
    params = sum(p.numel() for p in model.parameters())
    writing = []
    original = plots.write_analysis

    def timed_write(*a, **k):
        t0 = time.perf_counter()
        original(*a, **k)
        writing.append(time.perf_counter() - t0)

    plots.write_analysis = timed_write
    groups = corpus.read_text().splitlines()
    size = -(-len(groups) // args.slices)
    plain = full = 0.0
    tokens = 0
    for index in range(args.slices):
        part = work / f"slice{index}.jsonl"
        part.write_text("\n".join(groups[index * size:(index + 1) * size]) + "\n")
        seconds, count = plain_forwards(model, tokenizer, part, langs, args.batch)
        plain, tokens = plain + seconds, tokens + count
        t0 = time.perf_counter()
        analyze(model, part, work / f"analysis{index}", anchor=langs[0], batch_size=args.batch,
                tokenizer=tokenizer, progress=False)
        full += time.perf_counter() - t0
    written = sum(writing)
    print(f"model: qwen3_moe {params / 1e6:.1f}M params, {args.layers} layers x {args.experts} experts (top-2), "
          f"hidden {args.hidden}; corpus {args.groups} groups x {len(langs)} languages = {tokens:,} tokens; "
          f"batch {args.batch}; {args.slices} slices; torch threads {torch.get_num_threads()}")
    print(f"plain no-grad forwards: {plain:.2f} s; analysis: {full:.2f} s, of which writing plots+files "
          f"{written:.2f} s ({args.slices} analyses)")
    print(f"analysis without writing / plain = {(full - written) / plain:.3f}")
    print(f"analysis end to end (one writing) / plain = {(full - written + written / args.slices) / plain:.3f}")


if __name__ == "__main__":
    main()
