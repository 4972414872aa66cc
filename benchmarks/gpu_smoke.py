"""One prepared GPU run of SARA's costs on a ~1B-parameter random Qwen3-MoE (driver of gpu_smoke.sh).

    bash benchmarks/gpu_smoke.sh                        # CUDA: bf16, SDPA (+ FlashAttention 2 if installed), <= 8 min
    python benchmarks/gpu_smoke.py --tiny --output /tmp/smoke.json   # any machine: the same steps, tiny

Builds a random Qwen3-MoE (no download; 18 layers x 64 experts, top-8, hidden 1024, ~1B parameters)
and a synthetic parallel corpus whose examples mix 50 to 2,048 tokens, then, as a user would, times
`sara analyze` and `sara priors` (CLI) and runs `bench_train.run_arms` once per attention
implementation: the five arms of bench_train.py (SFT padded, SARA cached, SARA online with the
early-exit anchor, SFT packed, SARA packed), identical steps on one fixed batch per arm, the arm
order rotated every round. It prints the same ratios (per-round medians with min-max spread) plus
absolute tokens/s and CUDA allocator peaks (`max_memory_allocated`) per arm, then the memory ratio
at the realistic shape (one 4,096-token row, 128 experts, top-8, 28 aligned layers), and with
bitsandbytes present the SFT/SARA pair again as QLoRA. Everything goes to `--output` as JSON.
Never run by the tests (it refuses without CUDA unless `--tiny`).
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as B  # noqa: E402

from sara_moe.architectures.tiny import build_tiny_model, build_tokenizer  # noqa: E402

FULL = dict(hidden_size=1024, num_hidden_layers=18, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=256,
            intermediate_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
            max_position_embeddings=8192, vocab_size=32000)
TINY = dict(hidden_size=64, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512, vocab_size=1000)


def build_model(work: Path, shape: dict, dtype: torch.dtype) -> tuple[Path, int]:
    tok = build_tokenizer(B.WORDS * 4, vocab_size=400)
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


def attention_implementations(tiny: bool) -> list[str]:
    found = ["sdpa"]
    if not tiny and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        found.append("flash_attention_2")
    return found


def summary(result: dict) -> dict:
    times, tokens, memory = result["times"], result["tokens"], result["memory"]
    arms = {m: {"median_step_s": statistics.median(t), "tokens_per_step": tokens[m],
                "tokens_per_s": tokens[m] / statistics.median(t), "peak_bytes": memory[m]["peak"]}
            for m, t in times.items()}
    ratios = {arm: {"median": statistics.median(v), "min": min(v), "max": max(v)} for arm, v in result["ratios"].items()}
    peaks = {f"{a}/{b}": memory[a]["peak"] / memory[b]["peak"] for a, b in B.RATIOS.items() if a in memory and b in memory}
    return {"arms": arms, "step_time_ratios": ratios, "peak_memory_ratios": peaks, "times": times,
            "orders": result["orders"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on any device: checks the script, not the GPU")
    ap.add_argument("--steps", type=int, default=None, help="rounds per attention implementation (default 5; 5 tiny)")
    ap.add_argument("--no-qlora", action="store_true", help="skip the QLoRA pair even if bitsandbytes is present")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every arm")
    ap.add_argument("--output", default=None, help="JSON file for the results (default: stdout only)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device; run with --tiny to check the script on CPU", file=sys.stderr)
        return 2
    opts = B.parse_args(["--tiny"] if args.tiny else [])
    opts.steps = args.steps or opts.steps
    opts.checkpointing = args.checkpointing
    opts.dtype = "float32" if not torch.cuda.is_available() else "bfloat16"
    opts.mem_hidden = 64 if args.tiny else 512
    opts.mem_tokens = 256 if args.tiny else 4096
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sara_gpu_smoke_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, params = build_model(work, TINY if args.tiny else FULL, getattr(torch, opts.dtype))
    tok = build_tokenizer(B.WORDS * 4, vocab_size=400)
    corpus = work / "corpus.jsonl"
    B.make_corpus(corpus, opts.groups, lengths=B.words_for_tokens(tok, opts.length_range))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"gpu_smoke: {name}, random Qwen3-MoE {params / 1e6:,.1f}M params ({opts.dtype}), lengths {opts.lengths} "
          f"tokens, padded batch {opts.batch}, packed {opts.packed_rows} x {opts.max_length}, {opts.steps} rounds",
          flush=True)
    report = {"device": name, "params": params, "dtype": opts.dtype, "tiny": args.tiny, "torch": torch.__version__,
              "options": {k: v for k, v in vars(opts).items() if isinstance(v, (int, float, str, bool, type(None)))}}
    report["analyze_s"] = sara_cli("analyze", "--model", model_dir, "--data", corpus, "--output-dir", work / "analysis",
                                   "--dtype", opts.dtype, "--max-length", opts.max_length, "--overwrite")
    priors = work / "priors.safetensors"
    report["priors_s"] = sara_cli("priors", "--model", model_dir, "--data", corpus, "--output", priors,
                                  "--dtype", opts.dtype, "--max-length", opts.max_length, "--overwrite")
    kind = "max_memory_allocated" if device == "cuda" else "saved-for-backward + params/grads/Adam bytes"
    report["attention"] = {}
    for attn in attention_implementations(args.tiny):
        print(f"--- attention {attn}", flush=True)
        result = B.run_arms(model_dir, corpus, priors, work / attn, opts, device=device, attn_implementation=attn)
        B.report_arms(result, kind)
        report["attention"][attn] = summary(result)
    if not args.no_qlora and device == "cuda" and importlib.util.find_spec("bitsandbytes") is not None:
        print("--- QLoRA (load_in_4bit, LoRA on attention, experts and routers)", flush=True)
        result = B.run_arms(model_dir, corpus, priors, work / "qlora", opts, arms=("sft", "cached"), device=device,
                            load_in_4bit=True, use_peft=True, lora_preset="all")
        B.report_arms(result, kind)
        report["qlora"] = summary(result)
    mem = B.memory_at_shape(work, opts, device)
    sft, sara = mem["arms"]["sft"], mem["arms"]["cached"]
    report["memory_shape"] = {**mem, "ratio": sara["peak"] / sft["peak"]}
    print(f"memory at {sft['tokens']} tokens x 128 experts top-8 x 28 aligned layers (hidden {opts.mem_hidden}): "
          f"SARA / SFT peak ({kind}) = {sara['peak'] / sft['peak']:.4f}; SFT {sft['peak'] / 2**30:.2f} GiB, "
          f"SARA {sara['peak'] / 2**30:.2f} GiB  (target <= 1.02)")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
