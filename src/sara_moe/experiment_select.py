"""Choose the testbed's fine-tuning recipe on dev items only (`sara demo --select`).

    from sara_moe.experiment_select import select
    selection = select("runs/select", world="routed_topic", world_seeds=[100, 101])   # writes selection.json

Two stages, each a grid run through `experiment.run_experiment` on selection worlds (world seeds
that the reported study does not use) and read only from `dev_runs`, never from test:

1. **Regime** (`REGIME_GRID`, SFT arm): among learning rates x steps whose SFT keeps English
   shared-fact dev accuracy within `DAMAGE_POINTS` of the base model (a regime that damages the
   model it tunes says little about a method), the one with the best clone English-only dev
   accuracy: the strongest plain baseline.
2. **lambda_js** (`LAMBDA_GRID`, SARA arm at that regime): the largest dev gain of SARA over SFT
   on the clone's English-only facts among values that cost at most `DAMAGE_POINTS` on any
   shared split (clone and English); if none qualifies, the cheapest value, and the record says so.

`choose_regime` and `choose_lambda` are pure functions of summaries' `dev_runs`; `selection.json`
records the grids, every candidate's dev numbers, the choice and the rule.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from . import artifacts

REGIME_GRID = [{"learning_rate": lr, "max_steps": steps} for lr in (1e-4, 3e-4) for steps in (60, 120)]
LAMBDA_GRID = [1.0, 3.0, 10.0]
SELECTION_SEEDS = [100, 101]
DAMAGE_POINTS = 0.02  # accuracy (0..1) a fine-tuned arm may lose on a shared split
FT_SEEDS = [0, 1]


def dev_mean(summary: dict, arm: str, split: str, lang: str) -> float:
    """Mean dev accuracy of `arm` over the valid world seeds and FT seeds of a summary."""
    valid = {(w["world"], w["world_seed"]) for w in summary["worlds"] if w["valid"]}
    rows = [r["acc"] for r in summary["dev_runs"] if (r["arm"], r["split"], r["lang"]) == (arm, split, lang)
            and (r["world"], r["world_seed"]) in valid]
    if not rows:
        raise ValueError(f"no dev runs of arm {arm!r} ({split}, {lang}) in a valid world; selection needs them")
    return sum(rows) / len(rows)


def choose_regime(candidates: list[tuple[dict, dict]]) -> dict:
    """candidates: (regime, summary with base + sft). Returns {choice, table, rule_met}."""
    from .experiment import CLONE

    table = []
    for regime, summary in candidates:
        table.append({**regime, "base_en_shared": dev_mean(summary, "base", "shared", "en"),
                      "sft_en_shared": dev_mean(summary, "sft", "shared", "en"),
                      "sft_clone_en_only": dev_mean(summary, "sft", "en_only", CLONE)})
    safe = [row for row in table if row["sft_en_shared"] >= row["base_en_shared"] - DAMAGE_POINTS]
    pool = safe or table
    best = max(pool, key=lambda row: (row["sft_clone_en_only"], -row["learning_rate"], -row["max_steps"]))
    return {"choice": {k: best[k] for k in candidates[0][0]}, "table": table, "rule_met": bool(safe)}


def choose_lambda(candidates: list[tuple[float, dict]]) -> dict:
    """candidates: (lambda_js, summary with sft + sara at the chosen regime). Returns {choice, table, rule_met}."""
    from .experiment import CLONE

    table = []
    for lam, summary in candidates:
        row = {"lambda_js": lam, "gain_clone_en_only": dev_mean(summary, "sara", "en_only", CLONE)
               - dev_mean(summary, "sft", "en_only", CLONE)}
        row["cost"] = max(dev_mean(summary, "sft", "shared", lang) - dev_mean(summary, "sara", "shared", lang)
                          for lang in ("en", CLONE))
        table.append(row)
    ok = [row for row in table if row["cost"] <= DAMAGE_POINTS]
    best = max(ok, key=lambda r: (r["gain_clone_en_only"], -r["lambda_js"])) if ok else min(table, key=lambda r: r["cost"])
    return {"choice": best["lambda_js"], "table": table, "rule_met": bool(ok)}


def select(output_dir, world: str = "routed_topic", world_seeds: list | None = None, world_overrides: dict | None = None,
           regime_grid: list | None = None, lambda_grid: list | None = None, ft_seeds: list | None = None) -> dict:
    """Run both stages on dev and write `<output_dir>/selection.json`; returns it."""
    from .experiment import ExperimentConfig, Recipe, run_experiment

    out = Path(output_dir)
    seeds = list(world_seeds or SELECTION_SEEDS)
    common = dict(worlds=[world], world_seeds=seeds, ft_seeds=list(ft_seeds or FT_SEEDS),
                  world_overrides=dict(world_overrides or {}), cache_dir=str(out / "worlds"), runs_dir=str(out / "runs"))
    stage1 = []
    for regime in regime_grid or REGIME_GRID:
        recipe = replace(Recipe(), **regime)
        name = "regime-" + "-".join(f"{k}{v}" for k, v in regime.items())
        stage1.append((regime, run_experiment(ExperimentConfig(output_dir=str(out / name), arms=["base", "sft"],
                                                               recipe=recipe, **common))))
    regime = choose_regime(stage1)
    stage2 = []
    for lam in lambda_grid or LAMBDA_GRID:
        recipe = replace(Recipe(), **regime["choice"], lambda_js=float(lam))
        stage2.append((float(lam), run_experiment(ExperimentConfig(output_dir=str(out / f"lambda-{lam}"),
                                                                   arms=["base", "sft", "sara"], recipe=recipe, **common))))
    lam = choose_lambda(stage2)
    recipe = replace(Recipe(), **regime["choice"], lambda_js=lam["choice"])
    invalid = [w for w in stage1[0][1]["worlds"] if not w["valid"]]
    selection = {
        "recipe": asdict(recipe), "world": world, "world_seeds": seeds, "ft_seeds": common["ft_seeds"],
        "source": f"dev split of {world} world seeds {seeds} (FT seeds {common['ft_seeds']}); test never read",
        "regime": regime, "lambda": lam, "damage_points": DAMAGE_POINTS, "invalid_worlds": invalid,
        "rule": "regime: best SFT clone English-only dev accuracy among regimes keeping English shared dev accuracy "
                "within 2 points of base; lambda: best dev gain of SARA over SFT on clone English-only facts among "
                "values costing at most 2 points on any shared split",
    }
    artifacts.write_json(out / "selection.json", selection)
    return selection
