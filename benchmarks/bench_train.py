"""Cost of SARA over plain SFT, measured in one run (targets from issue 3).

    python benchmarks/bench_train.py [--steps 12] [--hidden 128] [--experts 16] [--seq 128] [--batch 8] [--threads 1]

Builds one random Qwen3-MoE (no download), extracts priors, then times identical training
steps on one fixed batch for three arms, interleaved round by round and with the order rotated
each round (round r starts with arm r mod 3), so that neither load from other processes nor
a machine that speeds up or slows down within a round favours an arm. A step-time ratio is
the median over rounds of (arm's time / SFT's time in the same round), `step_time_ratios`:

    python benchmarks/bench_train.py --times-json times.json   # per-round times, orders and ratios

- cached / SFT step time   (target <= 1.03)   SaraTrainer, lambda_js 1.5, cached priors
- online / SFT step time   (target <= 1.36)   anchor forward under no_grad each step
- peak memory ratio        (target <= 1.05)   CUDA: max_memory_allocated. CPU: there is no
  allocator counter, so the proxy is the bytes autograd saves for backward during the step
  (saved_tensors_hooks) plus parameters, gradients and Adam states, which is what differs
  between arms; RSS is too coarse for this and is not used.
- prior extraction tokens/s vs a plain no-grad forward over the same pre-tokenized batches
  (target >= 0.95); also end-to-end including reading and tokenizing the corpus.
SFT is TRL's SFTTrainer itself. Results go to stdout; copy them to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sara_moe import priors as P
from sara_moe.architectures.tiny import build_tiny_model, build_tokenizer
from sara_moe.data.corpus import encode
from sara_moe.data.train_data import build_train_dataset
from sara_moe.routing import pooled_routing
from sara_moe.runtime.loading import pad_batch
from sara_moe.train import SaraConfig, SaraTrainer

WORDS = ("the cat river market doctor water children school rice evening bus city teacher question board "
         "paka maji mto soko daktari watoto shule wali jioni basi mji mwalimu swali ubao gato agua río").split()


def make_corpus(path: Path, groups: int, words: int, seed: int = 0) -> None:
    rng = torch.Generator().manual_seed(seed)
    with open(path, "w") as fh:
        for g in range(groups):
            row = {"id": f"g{g}"}
            for lang in ("en", "sw", "es"):
                pick = lambda n: " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=rng))
                row[lang] = {"prompt": pick(words // 3), "response": pick(words)}
            fh.write(json.dumps(row) + "\n")


def arm_trainer(model_dir, corpus, priors, out, mode: str, args) -> SaraTrainer:
    from trl import SFTTrainer

    model, tok = P.load_model_and_tokenizer(str(model_dir))
    lam = 0.0 if mode == "sft" else 1.5
    cfg = SaraConfig(output_dir=str(out / mode), report_to="none", max_steps=1, per_device_train_batch_size=args.batch,
                     gradient_checkpointing=args.checkpointing, disable_tqdm=True, save_strategy="no",
                     lambda_js=lam, anchor_mode="online" if mode == "online" else "cached", max_length=args.seq,
                     learning_rate=1e-5, dataloader_num_workers=0)
    cache = P.load_priors(priors) if mode == "cached" else None
    data, _ = build_train_dataset(corpus, tok, max_length=args.seq, anchor_mode="online" if mode == "online" else "cached",
                                  prior_rows=cache.row_of() if cache else None)
    if mode == "sft":
        data = data.remove_columns([c for c in data.column_names if c.startswith("sara_")])
        return SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
    return SaraTrainer(model, args=cfg, train_dataset=data, processing_class=tok, priors=cache)


ARMS = ("sft", "cached", "online")


def arm_order(arms, round_index: int) -> list[str]:
    """The arms of round `round_index`, rotated by it: over len(arms) rounds each arm runs
    first, middle and last once."""
    arms = list(arms)
    shift = round_index % len(arms)
    return arms[shift:] + arms[:shift]


def step_time_ratios(times: dict[str, list[float]], baseline: str = "sft") -> dict[str, float]:
    """{arm: median over rounds of times[arm][r] / times[baseline][r]} for every arm but the baseline.

    Per-round ratios cancel load that changes between rounds, which a ratio of medians does not.
    """
    base = times[baseline]
    if not base or any(len(t) != len(base) for t in times.values()):
        raise ValueError(f"step times: every arm needs one time per round, got {({a: len(t) for a, t in times.items()})}")
    return {arm: statistics.median(t / b for t, b in zip(values, base))
            for arm, values in times.items() if arm != baseline}


class SavedBytes:
    def __init__(self):
        self.total = 0

    def __enter__(self):
        def pack(t):
            self.total += t.numel() * t.element_size()
            return t
        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def static_bytes(trainer) -> int:
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return sum(p.numel() * p.element_size() for p in params) * 4  # weights + grads + Adam m, v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--groups", type=int, default=256)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every arm")
    ap.add_argument("--times-json", help="also write the per-round step times, arm orders and ratios here")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 is steadier on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="sara_bench_"))
    corpus = work / "corpus.jsonl"
    make_corpus(corpus, args.groups, words=args.seq // 2)
    tok = build_tokenizer(WORDS * 4, vocab_size=400)
    model = build_tiny_model("qwen3_moe", vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                             num_experts=args.experts, moe_intermediate_size=args.hidden, intermediate_size=2 * args.hidden,
                             num_attention_heads=4, head_dim=args.hidden // 4, max_position_embeddings=4 * args.seq)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    params = sum(p.numel() for p in model.parameters())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, threads {torch.get_num_threads()}, model {params / 1e6:.2f}M params, "
          f"{args.layers} layers x {args.experts} experts, batch {args.batch} x <= {args.seq} tokens")

    # --- prior extraction vs plain no-grad forward over the same batches
    model = model.to(device).eval()
    groups = list(P.read_corpus(corpus, anchor="en"))
    encoded = [encode(g.texts["en"], tok, args.seq) for g in groups]  # as priors encode the anchors
    batches = [encoded[i: i + 16] for i in range(0, len(encoded), 16)]
    tokens = sum(len(e[0]) for e in encoded)
    recorder = P.RouterRecorder(model)
    plain, pooled = [], []  # per batch, alternating and in rotated order, so machine load hits both alike
    for repeat in range(3):
        for index, batch in enumerate(batches):
            ids, mask = pad_batch(tok, [e[0] for e in batch], side="right")
            for arm in arm_order(("plain", "pooled"), repeat * len(batches) + index):
                t0 = time.perf_counter()
                if arm == "plain":
                    with torch.no_grad():
                        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                    plain.append(time.perf_counter() - t0)
                else:
                    pooled_routing(model, recorder, [e[0] for e in batch], tok, [e[1] for e in batch],
                                   "all")
                    pooled.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    P.extract_priors(model, corpus, work / "priors.safetensors", tokenizer=tok, batch_size=16, max_length=args.seq,
                     progress=False)
    end_to_end = time.perf_counter() - t0
    per_batch = tokens / len(batches)
    tps_plain, tps_pooled = per_batch / statistics.median(plain), per_batch / statistics.median(pooled)
    print(f"prior extraction: {tps_pooled:,.0f} tok/s (median batch) / plain no-grad forward {tps_plain:,.0f} tok/s"
          f" = {tps_pooled / tps_plain:.3f}  (target >= 0.95); one end-to-end extract_priors run incl. reading, "
          f"tokenizing, writing: {tokens / end_to_end:,.0f} tok/s = {tokens / end_to_end / tps_plain:.3f}")

    # --- training step time and memory, arms interleaved
    arms = {m: arm_trainer(work / "model", corpus, work / "priors.safetensors", work, m, args)
            for m in ARMS}
    batch = {}
    for name, trainer in arms.items():
        trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + 2)
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we bypass
        if args.checkpointing:  # train() would enable it; we call training_step directly
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        batch[name] = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        trainer.training_step(trainer.model, dict(batch[name]))  # warm-up
    times, orders = {m: [] for m in arms}, []
    for round_index in range(args.steps):
        orders.append(arm_order(ARMS, round_index))
        for name in orders[-1]:
            trainer = arms[name]
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            trainer.training_step(trainer.model, dict(batch[name]))
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    ratios = step_time_ratios(times)
    memory = {}
    for name, trainer in arms.items():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            trainer.training_step(trainer.model, dict(batch[name]))
            memory[name] = torch.cuda.max_memory_allocated()
        else:
            with SavedBytes() as saved:
                trainer.training_step(trainer.model, dict(batch[name]))
            memory[name] = saved.total + static_bytes(trainer)
    print(f"step time (median of {args.steps}): SFT {med['sft'] * 1e3:.1f} ms, cached {med['cached'] * 1e3:.1f} ms, "
          f"online {med['online'] * 1e3:.1f} ms")
    print(f"cached / SFT step time = {ratios['cached']:.3f}  (median of {args.steps} per-round ratios; target <= 1.03)")
    print(f"online / SFT step time = {ratios['online']:.3f}  (median of {args.steps} per-round ratios; target <= 1.36)")
    if args.times_json:
        Path(args.times_json).write_text(json.dumps({"times": times, "orders": orders, "ratios": ratios}, indent=1))
    kind = "max_memory_allocated" if device == "cuda" else "saved-for-backward + params/grads/Adam bytes"
    print(f"peak memory ({kind}): cached / SFT = {memory['cached'] / memory['sft']:.4f}, "
          f"online / SFT = {memory['online'] / memory['sft']:.4f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
