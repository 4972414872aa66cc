"""`sara demo`: a controlled experiment on the cloned-language testbed, in minutes on a CPU.

    sara demo [--output_dir runs/demo] [--seed 0]          # one routed_topic world, 4 arms x 2 FT seeds
    sara demo --full [--output_dir runs/demo_full]         # all world kinds x 5 world seeds, 6 arms x 3 FT seeds
    sara demo --arms base,sft,sara,sara_shuffled,sara_mean --ft_seeds 3   # the single world, more controls
    sara demo --select                                     # re-choose the recipe on dev first
    sara demo --size ci                                    # tiny sizes, for tests
    sara demo --full --worlds routed_topic --arms base,sft,sara,kl,steer   # SARA beside the related methods

    from sara_moe.experiment.demo import run_demo
    summary = run_demo("runs/demo", seed=0)

A thin preset over `experiment.run_experiment` (worlds, arms, dev/test, controls, report):
the default is one `routed_topic` world (world seed `--seed`) with arms base / sft / sara /
sara_shuffled over FT seeds 0-1, sized to finish in about 5 minutes on 2 cores (pretraining the
world is ~200 s of it, a fine-tuning run ~20 s); `--full` runs the world kinds plain, routed_lang
and routed_topic over world seeds 0-4, FT seeds 0-2, and adds sara_mean and (where topics route)
sara_topic_shuffled. The
fine-tuning recipe is the one chosen on dev (`experiment.select`, shipped as
`sara_moe/experiment/testbed_recipe.json`); `--select` chooses it again on fresh selection worlds.
Outputs: `summary.json`, `report.md` (every sentence generated from the numbers),
`accuracy_<world>.png`, `demo_config.json` (the resolved `DemoConfig`) beside
`experiment_config.json` (the experiment it presets). `--full` (or `--neurons true`) also counts every
run's language neurons and compares SARA's with SFT's (`experiment.neuron_view`, "Language neurons").

Validity comes first: right after pretraining, the base model is checked against the validity
rule on dev items. An invalid world stops the default demo there (exit 1, one line: what failed,
by how much, which seed to try) before any prior or arm; `--full` skips that world's arms and
the report lists it with the reason.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sara_moe.runtime import artifacts
from sara_moe.runtime.options import parse_config

DEFAULT_ARMS = ["base", "sft", "sara", "sara_shuffled"]
FULL_ARMS = DEFAULT_ARMS + ["sara_mean", "sara_topic_shuffled"]
DEFAULT_FT_SEEDS, FULL_FT_SEEDS = 2, 3
FULL_WORLDS = ["plain", "routed_lang", "routed_topic"]
FULL_WORLD_SEEDS = [0, 1, 2, 3, 4]
# CI size: a world small enough to pretrain in seconds (it will not be valid; the test lowers the bar);
# the knowledge gate runs, with a check and a cool-down that fit in 120 steps
CI_WORLD = {"num_persons": 32, "num_documents": 2500, "hidden_size": 64, "max_steps": 120, "check_every": 40,
            "cooldown_steps": 40}
CI_RECIPE = {"max_steps": 10, "batch_size": 8, "learning_rate": 1e-3}


@dataclass
class DemoConfig:
    """Options of `sara demo` (flags, YAML keys and `run_demo()` keywords are these names)."""

    output_dir: str | None = field(default=None, metadata={"help": "none = runs/demo (runs/demo_full with full)"})
    seed: int = field(default=0, metadata={"help": "world seed of the default single-world demo"})
    full: bool = field(default=False, metadata={"help": "all world kinds x world seeds 0-4 (about 40 min on 2 cores)"})
    select: bool = field(default=False, metadata={"help": "choose the recipe on dev of selection worlds first"})
    size: str = field(default="small", metadata={"help": "small | ci (tiny sizes, for tests)",
                                                 "choices": ["small", "ci"]})
    ft_seeds: int | None = field(default=None, metadata={
        "help": f"fine-tuning seeds per arm; none = the preset's ({DEFAULT_FT_SEEDS}, {FULL_FT_SEEDS} with full)"})
    worlds: list[str] | None = field(default=None, metadata={"help": "world kinds; none = the preset's"})
    world_seeds: list[int] | None = field(default=None, metadata={"help": "world seeds; none = the preset's"})
    arms: list[str] | None = field(default=None, metadata={
        "help": "arms; none = the preset's (related methods: add kl, steer)"})
    jobs: int = field(default=2, metadata={"help": "fine-tuning runs in parallel (one CPU thread each)"})
    neurons: bool | None = field(default=None, metadata={
        "help": "count every run's language neurons (report: Language neurons); none = on with --full only"})

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = "runs/demo_full" if self.full else "runs/demo"


def preset(full: bool, seed: int = 0, worlds: list | None = None, world_seeds: list | None = None,
           arms: list | None = None, ft_seeds: int | None = None) -> dict:
    """The grid `sara demo` runs: the given options, else the single-world or the `--full` preset's."""
    ft_seeds = ft_seeds if ft_seeds is not None else (FULL_FT_SEEDS if full else DEFAULT_FT_SEEDS)
    if ft_seeds < 1:
        raise ValueError(f"--ft-seeds {ft_seeds}: need at least 1 fine-tuning seed per arm")
    return {"worlds": list(worlds or (FULL_WORLDS if full else ["routed_topic"])),
            "world_seeds": list(world_seeds if world_seeds is not None else (FULL_WORLD_SEEDS if full else [seed])),
            "arms": list(arms or (FULL_ARMS if full else DEFAULT_ARMS)), "ft_seeds": list(range(ft_seeds))}


def run_demo(output_dir="runs/demo", seed: int = 0, full: bool = False, select: bool = False, size: str = "small",
             ft_seeds: int | None = None, worlds: list | None = None, world_seeds: list | None = None, jobs: int = 1,
             validity: dict | None = None, arms: list | None = None, neurons: bool | None = None) -> dict:
    from sara_moe.experiment.run import VALIDITY, ExperimentConfig, Recipe, run_experiment
    from sara_moe.experiment.select import shipped_selection

    if size not in ("small", "ci"):
        raise ValueError(f"--size {size!r}: choose small or ci")
    grid = preset(full, seed, worlds, world_seeds, arms, ft_seeds)
    start = time.time()
    out = Path(output_dir)
    overrides = dict(CI_WORLD) if size == "ci" else {}
    if select:
        from sara_moe.experiment.select import select as run_selection

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
        output_dir=str(out), **grid, recipe=recipe, world_overrides=overrides, selected={"source": source, "selection": selection}, jobs=jobs,
        validity=dict(validity or VALIDITY), stop_on_invalid=not full, neurons=full if neurons is None else neurons)
    artifacts.write_json(out / "demo_config.json", artifacts.config_dict(DemoConfig(  # experiment_config.json: cfg
        output_dir=str(out), seed=seed, full=full, select=select, size=size, ft_seeds=len(grid["ft_seeds"]), worlds=worlds,
        world_seeds=world_seeds, arms=arms, jobs=jobs, neurons=neurons)))
    return run_experiment(cfg, progress_start=start)


def demo_cli(argv=None) -> int:
    cfg = parse_config(DemoConfig, argv, "sara demo", __doc__.split("\n\n")[0])
    summary = run_demo(**asdict(cfg))
    print(f"report written to {Path(cfg.output_dir) / 'report.md'} ({summary['seconds']:.0f} s)")
    return 0
