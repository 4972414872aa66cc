"""`sara demo`: a controlled experiment on the cloned-language testbed, in minutes on a CPU.

    sara demo [--output-dir runs/demo] [--seed 0]          # one routed_topic world, 5 arms x 3 FT seeds
    sara demo --full [--output-dir runs/demo_full]         # all world kinds x 5 world seeds
    sara demo --select                                     # re-choose the recipe on dev first
    sara demo --size ci                                    # tiny sizes, for tests

    from sara_moe.demo import run_demo
    summary = run_demo("runs/demo", seed=0)

A thin preset over `experiment.run_experiment` (worlds, arms, dev/test, controls, report):
the default is one `routed_topic` world (world seed `--seed`) with arms base / sft / sara /
sara_shuffled / sara_mean over FT seeds 0-2; `--full` runs the world kinds plain, routed_lang
and routed_topic over world seeds 0-4 and adds sara_topic_shuffled where topics route. The
fine-tuning recipe is the one chosen on dev (`experiment_select`, shipped as
`sara_moe/data/testbed_recipe.json`); `--select` chooses it again on fresh selection worlds.
Outputs: `summary.json`, `report.md` (every sentence generated from the numbers),
`accuracy_<world>.png`, `demo_config.json`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path

from . import artifacts

DEFAULT_ARMS = ["base", "sft", "sara", "sara_shuffled", "sara_mean"]
FULL_ARMS = DEFAULT_ARMS + ["sara_topic_shuffled"]
FULL_WORLDS = ["plain", "routed_lang", "routed_topic"]
FULL_WORLD_SEEDS = [0, 1, 2, 3, 4]
# CI size: a world small enough to pretrain in seconds (it will not be valid; the test lowers the bar)
CI_WORLD = {"num_persons": 32, "num_documents": 2500, "hidden_size": 64, "max_steps": 120}
CI_RECIPE = {"max_steps": 10, "batch_size": 8, "learning_rate": 1e-3}


def run_demo(output_dir="runs/demo", seed: int = 0, full: bool = False, select: bool = False, size: str = "small",
             ft_seeds: int = 3, worlds: list | None = None, world_seeds: list | None = None, jobs: int = 1,
             validity: dict | None = None) -> dict:
    from .experiment import VALIDITY, ExperimentConfig, Recipe, run_experiment
    from .experiment_select import shipped_selection

    if size not in ("small", "ci"):
        raise ValueError(f"--size {size!r}: choose small or ci")
    if ft_seeds < 1:
        raise ValueError(f"--ft-seeds {ft_seeds}: need at least 1 fine-tuning seed per arm")
    start = time.time()
    out = Path(output_dir)
    overrides = dict(CI_WORLD) if size == "ci" else {}
    if select:
        from .experiment_select import select as run_selection

        selection = run_selection(out / "select", world_overrides=overrides,
                                  **({"regime_grid": [CI_RECIPE], "lambda_grid": [1.0]} if size == "ci" else {}))
    else:
        selection = shipped_selection()
    recipe = replace(Recipe(), **selection.get("recipe", {}))
    if size == "ci" and not select:
        recipe = replace(recipe, **CI_RECIPE)
    source = selection.get("source", "package defaults (no selection file)") + (
        "; CI sizes override steps, batch and lr" if size == "ci" and not select else "")
    cfg = ExperimentConfig(
        output_dir=str(out), worlds=list(worlds or (FULL_WORLDS if full else ["routed_topic"])),
        world_seeds=list(world_seeds if world_seeds is not None else (FULL_WORLD_SEEDS if full else [seed])),
        arms=FULL_ARMS if full else DEFAULT_ARMS, ft_seeds=list(range(ft_seeds)), recipe=recipe,
        world_overrides=overrides, selected={"source": source, "selection": selection}, jobs=jobs,
        validity=dict(validity or VALIDITY))
    resolved = {"seed": seed, "full": full, "select": select, "size": size, "experiment": asdict(cfg),
                "metadata": artifacts.run_metadata(seed=seed)}
    artifacts.write_json(out / "demo_config.json", resolved)
    return run_experiment(cfg, progress_start=start)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of integers, e.g. 0,1,2") from None


def demo_cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sara demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="default runs/demo (runs/demo_full with --full)")
    parser.add_argument("--seed", type=int, default=0, help="world seed of the default single-world demo")
    parser.add_argument("--full", action="store_true", help="all world kinds x world seeds 0-4 (about an hour)")
    parser.add_argument("--select", action="store_true", help="choose the recipe on dev of selection worlds first")
    parser.add_argument("--size", default="small", choices=["small", "ci"])
    parser.add_argument("--ft-seeds", type=int, default=3, help="fine-tuning seeds per arm")
    parser.add_argument("--worlds", type=lambda s: [x for x in s.split(",") if x], help="world kinds, comma list")
    parser.add_argument("--world-seeds", type=_ints, help="comma list of world seeds")
    parser.add_argument("--jobs", type=int, default=2, help="fine-tuning runs in parallel (one CPU thread each)")
    args = parser.parse_args(argv)
    output = args.output_dir or ("runs/demo_full" if args.full else "runs/demo")
    summary = run_demo(output, args.seed, args.full, args.select, args.size, args.ft_seeds, args.worlds,
                       args.world_seeds, args.jobs)
    print(f"report written to {Path(output) / 'report.md'} ({summary['seconds']:.0f} s)")
    return 0
