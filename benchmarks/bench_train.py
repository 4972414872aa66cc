"""Cost of SARA over plain SFT at shapes users train with, measured in one run.

    python benchmarks/bench_train.py                       # realistic: lengths 50-2,048, 64 experts, top-8
    python benchmarks/bench_train.py --tiny                # CI-sized, seconds; its numbers mean nothing
    python benchmarks/bench_train.py --times-json t.json   # also the per-round times, arm orders and ratios

Builds one random Qwen3-MoE (no download), a parallel corpus whose example lengths are spread
log-uniformly over `--lengths`, extracts priors, then times identical training steps (one fixed
batch per arm) for five arms, interleaved round by round with the order rotated each round (round r
starts with arm r mod 5), so that load from other processes hits every arm alike:

- `sft`          TRL's SFTTrainer, padded batches of `--batch` examples
- `cached`       SaraTrainer, lambda_js 1.5, cached priors, padded                (target <= 1.03 x sft)
- `online`       SaraTrainer, online anchor (early exit after the band), padded   (target <= 1.10 x sft)
- `sft_packed`   SFTTrainer, `packing: true` (bfd, padding-free), `--packed-rows` rows of `--max-length`
- `sara_packed`  SaraTrainer, cached priors, the same packing                      (target <= 1.03 x sft_packed)

A ratio is the median over rounds of the per-round ratio (`step_time_ratios`), printed with the
spread (min-max) of the per-round ratios; tokens/s counts real (non-pad) tokens. SFT-packed vs
SFT-padded compares tokens/s. The band is `align_layers: middle` (ends at 35/48 = 73% depth).

Peak memory: CUDA `max_memory_allocated`; on CPU the proxy is the bytes autograd saves for backward
during the step's forward (saved_tensors_hooks) plus parameters, gradients and Adam states (what
differs between arms; RSS is too coarse). `--memory-shape` (on by default, off with --tiny) also measures it
at a realistic shape: one 4,096-token row, 128 experts, top-8, 28 aligned layers, SFT vs SARA.
Prior extraction tokens/s is compared with a plain no-grad forward over the same batches.
`gpu_smoke.py` runs these arms on a GPU with a ~1B model. Results go to stdout; copy to RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
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
from sara_moe.train import SaraConfig, SaraTrainer, build_model_for_training

WORDS = ("the cat river market doctor water children school rice evening bus city teacher question board "
         "paka maji mto soko daktari watoto shule wali jioni basi mji mwalimu swali ubao gato agua río").split()
ARMS = ("sft", "cached", "online", "sft_packed", "sara_packed")
RATIOS = {"cached": "sft", "online": "sft", "sara_packed": "sft_packed"}  # step-time ratio: arm / baseline
TINY = dict(hidden=32, layers=4, experts=4, top_k=2, lengths="36-60", max_length=64, batch=2, packed_rows=1,
            steps=5, groups=16, memory_shape=False)
REALISTIC = dict(hidden=128, layers=8, experts=64, top_k=8, lengths="50-2048", max_length=2048, batch=4,
                 packed_rows=1, steps=5, groups=32, memory_shape=True)


def make_corpus(path: Path, groups: int, words: int | None = None, seed: int = 0,
                lengths: tuple[int, int] | None = None) -> None:
    """`groups` parallel groups (en, sw, es; prompt + response). Each group's length in words is `words`,
    or drawn log-uniformly from `lengths` (min, max) so short and long examples mix as in real data."""
    rng = torch.Generator().manual_seed(seed)
    with open(path, "w") as fh:
        for g in range(groups):
            if lengths:
                low, high = math.log(lengths[0]), math.log(lengths[1])
                n = int(math.exp(low + (high - low) * float(torch.rand((), generator=rng))))
            else:
                n = words
            row = {"id": f"g{g}"}
            for lang in ("en", "sw", "es"):
                pick = lambda k: " ".join(WORDS[i] for i in torch.randint(len(WORDS), (max(k, 1),), generator=rng))
                row[lang] = {"prompt": pick(n // 4), "response": pick(n - n // 4)}
            fh.write(json.dumps(row) + "\n")


def words_for_tokens(tok, tokens: tuple[int, int]) -> tuple[int, int]:
    """The word range whose examples (template and special tokens included) span about `tokens` tokens."""
    def length(words: int) -> int:
        text = " ".join(WORDS[i % len(WORDS)] for i in range(words))
        return len(encode({"prompt": text[: len(text) // 4], "response": text[len(text) // 4:]}, tok)[0])

    per_word = (length(400) - length(200)) / 200
    overhead = length(200) - 200 * per_word  # template and special tokens
    return tuple(max(2, round((n - overhead) / per_word)) for n in tokens)


def arm_config(name: str, out: Path, opts, **extra) -> SaraConfig:
    sara, packed = name not in ("sft", "sft_packed"), name.endswith("_packed")
    return SaraConfig(output_dir=str(out / name), report_to="none", max_steps=1, disable_tqdm=True, save_strategy="no",
                      per_device_train_batch_size=opts.packed_rows if packed else opts.batch,
                      gradient_checkpointing=opts.checkpointing, lambda_js=1.5 if sara else 0.0,
                      anchor_mode="online" if name == "online" else "cached", max_length=opts.max_length,
                      packing=packed, learning_rate=1e-5, dataloader_num_workers=0, align_layers=[opts.align],
                      model_dtype=opts.dtype, **extra)


def arm_trainer(model_dir, corpus, priors, out, name: str, opts, **extra):
    """The trainer `sara train` would build for arm `name` (TRL's SFTTrainer for the SFT arms)."""
    from trl import SFTTrainer

    cfg = arm_config(name, out, opts, model_name_or_path=str(model_dir), **extra)
    model, tok, peft_config = build_model_for_training(cfg)
    cache = P.load_priors(priors) if cfg.lambda_js > 0 and cfg.anchor_mode == "cached" else None
    data, _ = build_train_dataset(corpus, tok, max_length=opts.max_length, anchor_mode=cfg.anchor_mode,
                                  prior_rows=cache.row_of() if cache else None, train_langs=opts.train_langs)
    if cfg.lambda_js == 0:
        data = data.remove_columns([c for c in data.column_names if c.startswith("sara_")])
        return SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=peft_config)
    return SaraTrainer(model, args=cfg, train_dataset=data, processing_class=tok, priors=cache, peft_config=peft_config)


def arm_order(arms, round_index: int) -> list[str]:
    """The arms of round `round_index`, rotated by it: over len(arms) rounds each arm runs in every position once."""
    arms = list(arms)
    shift = round_index % len(arms)
    return arms[shift:] + arms[:shift]


def per_round_ratios(times: dict[str, list[float]], arm: str, baseline: str) -> list[float]:
    base = times[baseline]
    if not base or len(times[arm]) != len(base):
        raise ValueError(f"step times: every arm needs one time per round, got {({a: len(t) for a, t in times.items()})}")
    return [t / b for t, b in zip(times[arm], base)]


def step_time_ratios(times: dict[str, list[float]], baseline: str = "sft") -> dict[str, float]:
    """{arm: median over rounds of times[arm][r] / times[baseline][r]} for every arm but the baseline.

    Per-round ratios cancel load that changes between rounds, which a ratio of medians does not.
    """
    for values in times.values():
        if not times[baseline] or len(values) != len(times[baseline]):
            raise ValueError(f"step times: every arm needs one time per round, got "
                             f"{({a: len(t) for a, t in times.items()})}")
    return {arm: statistics.median(per_round_ratios(times, arm, baseline)) for arm in times if arm != baseline}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}, {len(values)} rounds)"


class SavedBytes:
    """Bytes autograd saves for backward during the forward inside the context (the CPU stand-in for an
    allocator peak). Saves made inside backward (a checkpoint's or the alignment term's recompute) are
    transient, one layer at a time, and are not summed."""

    def __init__(self):
        self.total = 0

    def __enter__(self):
        def pack(t):
            if torch._C._current_graph_task_id() == -1:  # not inside the autograd engine
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


def real_tokens(batch) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["position_ids"].numel())  # padding-free rows hold no pads unless padded to a multiple


def step_memory(trainer, batch, device: str) -> dict:
    """{'peak': bytes, 'saved': bytes autograd kept (CPU) or None} for one training step."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        trainer.training_step(trainer.model, dict(batch))
        return {"peak": torch.cuda.max_memory_allocated(), "saved": None}
    with SavedBytes() as saved:
        trainer.training_step(trainer.model, dict(batch))
    return {"peak": saved.total + static_bytes(trainer), "saved": saved.total}


def prepare(trainer, opts, steps: int, warm_up: bool = True):
    trainer.create_optimizer_and_scheduler(num_training_steps=steps + 2)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we bypass
    if opts.checkpointing:  # train() would enable it; we call training_step directly
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    if warm_up:
        trainer.training_step(trainer.model, dict(batch))
    return batch


def timed_step(trainer, batch, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.training_step(trainer.model, dict(batch))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_arms(model_dir, corpus, priors, work, opts, arms=ARMS, device="cpu", attn_implementation=None,
             **extra) -> dict:
    """Every arm's trainer and fixed batch, then `opts.steps` rounds in rotated order; step times,
    tokens per step, memory per arm, and the per-round ratios. `extra`: more SaraConfig fields."""
    trainers = {m: arm_trainer(model_dir, corpus, priors, work, m, opts, **extra) for m in arms}
    for trainer in trainers.values():
        if attn_implementation:
            trainer.model.set_attn_implementation(attn_implementation)
    batches = {m: prepare(t, opts, opts.steps) for m, t in trainers.items()}
    tokens = {m: real_tokens(b) for m, b in batches.items()}
    times, orders = {m: [] for m in arms}, []
    for round_index in range(opts.steps):
        orders.append(arm_order(arms, round_index))
        for name in orders[-1]:
            times[name].append(timed_step(trainers[name], batches[name], device))
    memory = {m: step_memory(trainers[m], batches[m], device) for m in arms}
    ratios = {a: per_round_ratios(times, a, b) for a, b in RATIOS.items() if a in times and b in times}
    if "sft_packed" in times and "sft" in times:  # tokens/s ratio, per round
        ratios["sft_packed_tokens_per_s"] = [(tokens["sft_packed"] / p) / (tokens["sft"] / s)
                                             for p, s in zip(times["sft_packed"], times["sft"])]
    del trainers
    gc.collect()
    return {"times": times, "orders": orders, "tokens": tokens, "memory": memory, "ratios": ratios}


def report_arms(result: dict, kind: str) -> None:
    times, tokens, memory, ratios = result["times"], result["tokens"], result["memory"], result["ratios"]
    for name in times:
        med = statistics.median(times[name])
        print(f"  {name:<12} step {med * 1e3:8.1f} ms  {tokens[name]:6d} real tokens/step  "
              f"{tokens[name] / med:9,.0f} tokens/s  peak {memory[name]['peak'] / 2**20:9.1f} MiB")
    targets = {"cached": 1.03, "online": 1.10, "sara_packed": 1.03}
    for arm, values in ratios.items():
        if arm == "sft_packed_tokens_per_s":
            print(f"sft_packed / SFT tokens/s = {spread(values)}  (reported as measured)")
        else:
            print(f"{arm} / {RATIOS[arm]} step time = {spread(values)}  (target <= {targets[arm]})")
    for arm, base in RATIOS.items():
        if arm in memory and base in memory:
            print(f"peak memory ({kind}): {arm} / {base} = {memory[arm]['peak'] / memory[base]['peak']:.4f}")


def memory_at_shape(work: Path, opts, device: str) -> dict:
    """SFT vs SARA (cached) on one 4,096-token example, 128 experts, top-8, 28 layers, all aligned."""
    shape = dict(hidden=opts.mem_hidden, layers=28, experts=128, top_k=8)
    tok = build_tokenizer(WORDS * 4, vocab_size=400)
    model = build_tiny_model("qwen3_moe", vocab_size=len(tok), hidden_size=shape["hidden"], num_hidden_layers=28,
                             num_experts=128, num_experts_per_tok=8, moe_intermediate_size=shape["hidden"] // 4,
                             intermediate_size=2 * shape["hidden"], num_attention_heads=4,
                             head_dim=shape["hidden"] // 4, max_position_embeddings=8192)
    folder = work / "memory_model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    corpus = work / "memory_corpus.jsonl"
    words = int(1.1 * words_for_tokens(tok, (opts.mem_tokens, opts.mem_tokens))[1])
    make_corpus(corpus, 1, words=words, seed=1)  # a little longer than --mem-tokens: truncated to it
    priors = P.extract_priors(str(folder), corpus, work / "memory_priors.safetensors", max_length=opts.mem_tokens,
                              batch_size=1, progress=False)
    mem_opts = argparse.Namespace(**{**vars(opts), "batch": 1, "max_length": opts.mem_tokens, "align": "0-27",
                                     "train_langs": "sw"})
    out = {}
    for name in ("sft", "cached"):
        trainer = arm_trainer(folder, corpus, priors, work / "memory", name, mem_opts)
        batch = prepare(trainer, mem_opts, 1, warm_up=False)  # memory only: no timing
        out[name] = {**step_memory(trainer, batch, device), "tokens": real_tokens(batch)}
        del trainer
        gc.collect()
    return {"shape": shape, "arms": out}


def prior_extraction(model, tok, corpus, work: Path, opts, device: str) -> None:
    """Prior extraction tokens/s vs a plain no-grad forward over the same pre-tokenized batches."""
    model = model.to(device).eval()
    groups = list(P.read_corpus(corpus, anchor="en"))
    encoded = [encode(g.texts["en"], tok, opts.max_length) for g in groups]  # as priors encode the anchors
    batches = [encoded[i: i + 8] for i in range(0, len(encoded), 8)]
    tokens = sum(len(e[0]) for e in encoded)
    recorder = P.RouterRecorder(model)
    plain, pooled = [], []  # per batch, alternating and in rotated order, so machine load hits both alike
    for repeat in range(2):
        for index, batch in enumerate(batches):
            ids, mask = pad_batch(tok, [e[0] for e in batch], side="right")
            for arm in arm_order(("plain", "pooled"), repeat * len(batches) + index):
                t0 = time.perf_counter()
                if arm == "plain":
                    with torch.no_grad():
                        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                    plain.append(time.perf_counter() - t0)
                else:
                    pooled_routing(model, recorder, [e[0] for e in batch], tok, [e[1] for e in batch], "all")
                    pooled.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    P.extract_priors(model, corpus, work / "priors.safetensors", tokenizer=tok, batch_size=8,
                     max_length=opts.max_length, progress=False)
    end_to_end = time.perf_counter() - t0
    per_batch = tokens / len(batches)
    tps_plain, tps_pooled = per_batch / statistics.median(plain), per_batch / statistics.median(pooled)
    print(f"prior extraction: {tps_pooled:,.0f} tok/s (median batch) / plain no-grad forward {tps_plain:,.0f} tok/s"
          f" = {tps_pooled / tps_plain:.3f}  (target >= 0.95); one end-to-end extract_priors run incl. reading, "
          f"tokenizing, writing: {tokens / end_to_end:,.0f} tok/s = {tokens / end_to_end / tps_plain:.3f}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CI-sized preset (seconds); its numbers mean nothing")
    for name, kind in (("steps", int), ("hidden", int), ("layers", int), ("experts", int), ("top-k", int),
                       ("lengths", str), ("max-length", int), ("batch", int), ("packed-rows", int), ("groups", int)):
        ap.add_argument(f"--{name}", type=kind, default=None, help=f"default {REALISTIC[name.replace('-', '_')]}"
                        f" ({TINY[name.replace('-', '_')]} with --tiny)")
    ap.add_argument("--memory-shape", action=argparse.BooleanOptionalAction, default=None,
                    help="also measure memory at 4,096 tokens x 128 experts x 28 aligned layers (default: not --tiny)")
    ap.add_argument("--memory-only", action="store_true", help="only the memory-shape measurement")
    ap.add_argument("--mem-hidden", type=int, default=256, help="hidden size of the memory-shape model")
    ap.add_argument("--mem-tokens", type=int, default=4096)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every arm")
    ap.add_argument("--times-json", help="also write the per-round step times, arm orders and ratios here")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 is steadier on a shared machine)")
    opts = ap.parse_args(argv)
    preset = TINY if opts.tiny else REALISTIC
    for key, value in preset.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.length_range = tuple(int(x) for x in opts.lengths.split("-"))
    opts.align, opts.dtype, opts.train_langs = "middle", "float32", None
    return opts


def bench_workdir(opts, prefix: str):
    """A temp work dir with the corpus (`opts.groups` groups, lengths over `opts.length_range`) and a random
    Qwen3-MoE of `opts`' shape saved with its tokenizer in `work/model`: (work, corpus, tokenizer, model)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    corpus = work / "corpus.jsonl"
    tok = build_tokenizer(WORDS * 4, vocab_size=400)
    make_corpus(corpus, opts.groups, lengths=words_for_tokens(tok, opts.length_range))
    model = build_tiny_model("qwen3_moe", vocab_size=len(tok), hidden_size=opts.hidden, num_hidden_layers=opts.layers,
                             num_experts=opts.experts, num_experts_per_tok=opts.top_k, moe_intermediate_size=opts.hidden,
                             intermediate_size=2 * opts.hidden, num_attention_heads=4, head_dim=opts.hidden // 4,
                             max_position_embeddings=2 * opts.max_length)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    return work, corpus, tok, model


def main(argv=None) -> None:
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    work, corpus, tok, model = bench_workdir(opts, "sara_bench_")
    params = sum(p.numel() for p in model.parameters())
    lengths = sorted(len(encode(g.texts["sw"], tok, opts.max_length)[0]) for g in P.read_corpus(corpus, anchor="en"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, threads {torch.get_num_threads()}, model {params / 1e6:.2f}M params, {opts.layers} layers "
          f"x {opts.experts} experts top-{opts.top_k}, example lengths {lengths[0]}-{lengths[-1]} tokens (median "
          f"{lengths[len(lengths) // 2]}), padded batch {opts.batch}, packed {opts.packed_rows} x {opts.max_length}")
    kind = "max_memory_allocated" if device == "cuda" else "saved-for-backward + params/grads/Adam bytes"
    if not opts.memory_only:
        prior_extraction(model, tok, corpus, work, opts, device)
        del model
        result = run_arms(work / "model", corpus, work / "priors.safetensors", work, opts, device=device)
        report_arms(result, kind)
        if opts.times_json:
            Path(opts.times_json).write_text(json.dumps({k: result[k] for k in ("times", "orders", "tokens", "ratios")},
                                                        indent=1))
    if opts.memory_shape or opts.memory_only:
        mem = memory_at_shape(work, opts, device)
        sft, sara = mem["arms"]["sft"], mem["arms"]["cached"]
        print(f"memory at {sft['tokens']} tokens x 128 experts top-8 x 28 aligned layers (hidden {opts.mem_hidden}): "
              f"SARA / SFT peak ({kind}) = {sara['peak'] / sft['peak']:.4f}"
              + ("" if sft["saved"] is None else f"; saved-for-backward only = {sara['saved'] / sft['saved']:.4f} "
                 f"(+{(sara['saved'] - sft['saved']) / 2**20:.1f} MiB of {sft['saved'] / 2**20:.1f} MiB)"))


if __name__ == "__main__":
    main()
