"""Cost of the routing monitor (`probe_data`) on a `sara train` run, measured in one run.

    python benchmarks/bench_monitor.py                      # 64 experts top-8, lengths 50-1,024, probe 32 groups
    python benchmarks/bench_monitor.py --tiny               # CI-sized, seconds; its numbers mean nothing
    python benchmarks/bench_monitor.py --cadences default,10,50 --times-json t.json

Builds one random Qwen3-MoE (no download) and a parallel corpus (en, sw, es) whose example lengths
are spread log-uniformly over `--lengths` (`bench_train.make_corpus`), extracts priors, then builds
the trainer `sara train` builds with `probe_data: split` (`--probe-groups` groups held out, cached
priors, lambda_js 1.5) once without its `RoutingMonitor` and once per cadence with it. Every arm
trains on the same examples (the probe groups are held out of all of them). Each round times
`trainer.train()` of `--steps` optimizer steps for every arm, the order rotated each round
(`bench_train.arm_order`) so that load from other processes hits every arm alike; the ratio is the
median over rounds of the per-round wall-time ratio (monitor / no monitor), printed with the spread.
`default` is the monitor's default cadence, `monitor_steps: none` = `logging_steps` when not
evaluating (SaraConfig's default logging_steps is 1: a pass every step); `--logging-steps` sets it.
The monitor's own `monitor/seconds` are summed from `log_history` as a cross-check. Results go to
stdout; copy to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import PrinterCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import arm_order, bench_workdir, per_round_ratios, spread  # noqa: E402

from sara_moe import priors as P  # noqa: E402
from sara_moe.train import RoutingMonitor, SaraConfig, build_trainer  # noqa: E402

TINY = dict(hidden=32, layers=4, experts=4, top_k=2, lengths="36-60", max_length=64, batch=2, steps=4, groups=24,
            probe_groups=4, rounds=2, cadences="default,2")
REALISTIC = dict(hidden=128, layers=8, experts=64, top_k=8, lengths="50-1024", max_length=1024, batch=4, steps=25,
                 groups=96, probe_groups=32, rounds=3, cadences="default,5,25")
TARGET = 1.05


def arm_trainer(model_dir, corpus, priors, out: Path, opts, cadence: int | None, monitored: bool):
    cfg = SaraConfig(output_dir=str(out), model_name_or_path=str(model_dir), data=str(corpus), priors=str(priors),
                     report_to="none", max_steps=opts.steps, disable_tqdm=True, save_strategy="no",
                     per_device_train_batch_size=opts.batch, gradient_accumulation_steps=opts.grad_accum,
                     gradient_checkpointing=False, lambda_js=1.5,
                     max_length=opts.max_length, learning_rate=1e-5, dataloader_num_workers=0, align_layers=["middle"],
                     logging_steps=opts.logging_steps, probe_data="split", probe_groups=opts.probe_groups,
                     monitor_steps=cadence)
    trainer, _ = build_trainer(cfg)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm's per-log printing would drown the results
    if not monitored:
        trainer.remove_callback(RoutingMonitor)
    return trainer


def run(opts) -> dict:
    work, corpus, _, model = bench_workdir(opts, "sara_bench_monitor_")
    params = sum(p.numel() for p in model.parameters())
    del model
    priors = P.extract_priors(str(work / "model"), corpus, work / "priors.safetensors", max_length=opts.max_length,
                              progress=False)
    cadences = [None if c == "default" else int(c) for c in opts.cadences.split(",")]
    arms = {"plain": arm_trainer(work / "model", corpus, priors, work / "plain", opts, None, False)}
    for cadence in cadences:
        name = f"monitor@{cadence or 'default'}"
        arms[name] = arm_trainer(work / "model", corpus, priors, work / name, opts, cadence, True)
    device = arms["plain"].args.device
    print(f"device {device}, threads {torch.get_num_threads()}, model {params / 1e6:.2f}M params, {opts.layers} layers "
          f"x {opts.experts} experts top-{opts.top_k}, {opts.steps} steps of {opts.grad_accum} x batch {opts.batch} "
          f"per arm and round, "
          f"probe {opts.probe_groups} groups x 3 languages, logging_steps {opts.logging_steps}")
    times = {name: [] for name in arms}
    orders, monitor_seconds, every = [], {name: [] for name in arms}, {}
    passes = {name: [] for name in arms}
    for round_index in range(opts.rounds):
        order = arm_order(arms, round_index)
        orders.append(order)
        for name in order:
            trainer = arms[name]
            began = time.perf_counter()
            trainer.train()  # a fresh TrainerState (and log_history) per call, continuing from the current weights
            times[name].append(time.perf_counter() - began)
            monitor_seconds[name].append(sum(h.get("monitor/seconds", 0.0) for h in trainer.state.log_history))
            passes[name].append(sum("monitor/seconds" in h for h in trainer.state.log_history))
            monitor = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RoutingMonitor)), None)
            if monitor is not None:
                every[name] = monitor.every
    ratios = {name: per_round_ratios(times, name, "plain") for name in arms if name != "plain"}
    return {"times": times, "orders": orders, "ratios": ratios, "monitor_seconds": monitor_seconds, "every": every,
            "passes": passes}


def report(result: dict, opts) -> None:
    times = result["times"]
    print(f"  plain        train() {statistics.median(times['plain']):8.3f} s (median of {opts.rounds} rounds)")
    for name, ratios in result["ratios"].items():
        share = [m / t for m, t in zip(result["monitor_seconds"][name], times[name])]
        print(f"  {name:<12} train() {statistics.median(times[name]):8.3f} s, cadence {result['every'][name]} steps, "
              f"passes per run {result['passes'][name]}, monitor/seconds share of the run {statistics.median(share):.3f}")
        print(f"{name} / plain wall time = {spread(ratios)}  (target <= {TARGET})")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CI-sized preset (seconds); its numbers mean nothing")
    for name, kind in (("steps", int), ("hidden", int), ("layers", int), ("experts", int), ("top-k", int),
                       ("lengths", str), ("max-length", int), ("batch", int), ("groups", int), ("probe-groups", int),
                       ("rounds", int), ("cadences", str)):
        key = name.replace("-", "_")
        ap.add_argument(f"--{name}", type=kind, default=None, help=f"default {REALISTIC[key]} ({TINY[key]} with --tiny)")
    ap.add_argument("--logging-steps", type=int, default=1, help="the run's logging_steps (SaraConfig's default 1)")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="gradient_accumulation_steps: batches per optimizer step (the paper configs use 16)")
    ap.add_argument("--times-json", help="also write the per-round wall times, arm orders and ratios here")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 is steadier on a shared machine)")
    opts = ap.parse_args(argv)
    preset = TINY if opts.tiny else REALISTIC
    for key, value in preset.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.length_range = tuple(int(x) for x in opts.lengths.split("-"))
    return opts


def main(argv=None) -> None:
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    result = run(opts)
    report(result, opts)
    if opts.times_json:
        Path(opts.times_json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
