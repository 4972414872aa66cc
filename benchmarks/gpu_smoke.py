"""GPU smoke run of the whole SARA line on a ~1B-parameter random Qwen3-MoE (driver of gpu_smoke.sh).

    bash benchmarks/gpu_smoke.sh                      # CUDA machine: ~1B model, bf16, 20 steps per arm
    python benchmarks/gpu_smoke.py --tiny --output /tmp/smoke.json   # any machine: the same steps, tiny

Builds a random Qwen3-MoE (no download; 18 layers x 32 experts, top-4, hidden 1024, ~1.0B
parameters, saved in bf16), a synthetic parallel corpus, then runs, as a user would:
`sara analyze` and `sara priors` (CLI, timed), and in this process the trainer `sara train` builds (`build_trainer`)
for 20 steps of plain SFT (lambda_js 0, no priors) and 20 of SARA (lambda_js 1.5, cached
priors), each on a fresh model, in `--rounds` rounds whose order alternates (SFT SARA, SARA SFT). It prints and writes (JSON) the median step time of steps
after the warm-up and CUDA's peak allocated memory per arm, and the SARA/SFT ratios (goal
<= 1.02 each). With bitsandbytes present it repeats both arms as QLoRA (`load_in_4bit`,
LoRA on attention, experts and routers). `--tiny` shrinks everything so the script's CPU
path can be checked anywhere; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import WORDS, make_corpus  # noqa: E402

from sara_moe.architectures.tiny import build_tiny_model, build_tokenizer  # noqa: E402
from sara_moe.train import SaraConfig, build_trainer  # noqa: E402

FULL = dict(hidden_size=1024, num_hidden_layers=18, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
            intermediate_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
            max_position_embeddings=4096, vocab_size=32000)
TINY = dict(hidden_size=64, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512, vocab_size=1000)


class StepClock(TrainerCallback):
    """Wall time of every optimizer step (CUDA synchronised, so the times are the GPU's)."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def build_model(work: Path, shape: dict, dtype: torch.dtype) -> tuple[Path, int]:
    tok = build_tokenizer(WORDS * 4, vocab_size=400)
    model = build_tiny_model("qwen3_moe", seed=0, **shape).to(dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    del model
    return work / "model", params


def sara_cli(*args) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sara_moe.cli", *map(str, args)], check=True, env=env)
    return time.perf_counter() - start


def run_arm(name: str, work: Path, model_dir: Path, corpus: Path, priors: Path | None, opts, **extra) -> dict:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = SaraConfig(output_dir=str(work / name), model_name_or_path=str(model_dir), data=str(corpus),
                     priors=str(priors) if priors else None, lambda_js=1.5 if priors else 0.0,
                     max_steps=opts.steps, per_device_train_batch_size=opts.batch, max_length=opts.seq,
                     learning_rate=1e-5, lr_scheduler_type="constant", report_to="none", save_strategy="no",
                     disable_tqdm=True, logging_steps=1, seed=0, dataloader_num_workers=0,
                     gradient_checkpointing=opts.checkpointing, model_dtype=opts.dtype, overwrite_output_dir=True,
                     **extra)
    clock = StepClock()
    trainer, _ = build_trainer(cfg)  # what `sara train` builds
    trainer.add_callback(clock)
    trainer.train()
    warm = clock.times[opts.warmup:] or clock.times
    logged = [h for h in trainer.state.log_history if "js_loss" in h]
    result = {"arm": name, "steps": len(clock.times), "median_step_s": statistics.median(warm), "warm_step_s": warm,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
              "last_loss": logged[-1]["loss"] if logged else None, "last_js": logged[-1]["js_loss"] if logged else None}
    del trainer
    print(json.dumps(result), flush=True)
    return result


def ratio(a, b):
    return None if a is None or b is None else a / b


def run_pair(pair, opts, **shared) -> list[dict]:
    """Both arms of `pair` for `opts.rounds` rounds, order reversed every other round (A B, B A, ...),
    so warm-up effects and machine drift hit both arms alike; per arm, the median over every warm
    step of every round and the largest peak memory."""
    runs = {name: [] for name, _, _ in pair}
    for round_index in range(opts.rounds):
        for name, priors, extra in (pair if round_index % 2 == 0 else pair[::-1]):
            runs[name].append(run_arm(name, priors=priors, opts=opts, **shared, **extra))
    merged = []
    for name, results in runs.items():
        mems = [r["peak_mem_gib"] for r in results if r["peak_mem_gib"] is not None]
        merged.append({"arm": name, "rounds": len(results), "steps": sum(r["steps"] for r in results),
                       "median_step_s": statistics.median(t for r in results for t in r["warm_step_s"]),
                       "peak_mem_gib": max(mems) if mems else None, "last_loss": results[-1]["last_loss"],
                       "last_js": results[-1]["last_js"], "per_round_median_s": [r["median_step_s"] for r in results]})
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on any device: checks the script, not the GPU")
    ap.add_argument("--steps", type=int, default=None, help="steps per arm (default 20; 3 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the median (default 5; 1 with --tiny)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--groups", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per arm pair, order reversed each round (default 2)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every arm")
    ap.add_argument("--no-qlora", action="store_true", help="skip the QLoRA arms even if bitsandbytes is present")
    ap.add_argument("--output", default=None, help="JSON file for the results (default: stdout only)")
    ap.add_argument("--workdir", default=None)
    opts = ap.parse_args(argv)
    if not opts.tiny and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device; run with --tiny to check the script on CPU", file=sys.stderr)
        return 2
    opts.steps = opts.steps or (3 if opts.tiny else 20)
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if opts.tiny else 5)
    opts.dtype = "float32" if opts.tiny and not torch.cuda.is_available() else "bfloat16"
    if opts.tiny:
        opts.seq, opts.groups, opts.batch = min(opts.seq, 64), min(opts.groups, 16), 2
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="sara_gpu_smoke_"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    make_corpus(corpus, opts.groups, words=opts.seq // 2)
    model_dir, params = build_model(work, TINY if opts.tiny else FULL, getattr(torch, opts.dtype))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"gpu_smoke: {device}, random Qwen3-MoE {params / 1e6:,.1f}M params ({opts.dtype}), "
          f"batch {opts.batch} x <= {opts.seq} tokens, {opts.steps} steps per arm", flush=True)
    report = {"device": device, "params": params, "dtype": opts.dtype, "tiny": opts.tiny, "steps": opts.steps,
              "rounds": opts.rounds,
              "warmup": opts.warmup, "batch": opts.batch, "seq": opts.seq, "torch": torch.__version__}
    report["analyze_s"] = sara_cli("analyze", "--model", model_dir, "--data", corpus, "--output-dir", work / "analysis",
                                   "--dtype", opts.dtype, "--max-length", opts.seq, "--overwrite")
    report["priors_s"] = sara_cli("priors", "--model", model_dir, "--data", corpus, "--output",
                                  work / "priors.safetensors", "--dtype", opts.dtype, "--max-length", opts.seq, "--overwrite")
    priors = work / "priors.safetensors"
    shared = dict(work=work, model_dir=model_dir, corpus=corpus)
    arms = run_pair([("sft", None, {}), ("sara", priors, {})], opts, **shared)
    qlora = importlib.util.find_spec("bitsandbytes") is not None and not opts.no_qlora
    if qlora:
        peft = dict(load_in_4bit=True, use_peft=True, lora_preset="all")
        arms += run_pair([("sft_qlora", None, peft), ("sara_qlora", priors, peft)], opts, **shared)
    report["arms"] = arms
    by = {a["arm"]: a for a in arms}
    pairs = [("sara", "sft")] + ([("sara_qlora", "sft_qlora")] if qlora else [])
    report["ratios"] = {f"{a}/{b}": {"step_time": ratio(by[a]["median_step_s"], by[b]["median_step_s"]),
                                     "peak_memory": ratio(by[a]["peak_mem_gib"], by[b]["peak_mem_gib"])}
                        for a, b in pairs}
    for name, r in report["ratios"].items():
        mem = "n/a (no CUDA)" if r["peak_memory"] is None else f"{r['peak_memory']:.3f}"
        print(f"{name}: step time {r['step_time']:.3f} (goal <= 1.02), peak memory {mem} (goal <= 1.02)")
    if not qlora:
        print("QLoRA arms skipped: " + ("--no-qlora" if opts.no_qlora else "bitsandbytes is not installed"))
    if opts.output:
        Path(opts.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
