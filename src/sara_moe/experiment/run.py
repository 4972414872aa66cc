"""Worlds x world seeds x arms x fine-tuning seeds on the cloned-language testbed: the library behind `sara demo`.

    from sara_moe.experiment.run import ExperimentConfig, run_experiment
    summary = run_experiment(ExperimentConfig(output_dir="runs/exp", worlds=["routed_topic"], world_seeds=[0],
                                              arms=["base", "sft", "sara", "sara_shuffled", "sara_mean"]))

The question: when does aligning a language's routing to its English anchor recover knowledge
that transfer alone does not? Every world is English plus one clone language (`clone`: its own
function words, entity names shared with English, 20% of pretraining); English pretraining text
states every fact, the clone's only half of them (`shared`); the other half (`en_only`) can reach
the clone only by transfer. World kinds (`WORLD_KINDS`) differ in the testbed's routing knob:
`plain` (none), `routed_lang` (each language pushed onto its own half of the experts on MoE
layers 1-2), `routed_topic` (each (language, topic) pair onto its own two of 16 experts, so an
English anchor's routing says what its sentence is about).

Arms (`ARMS`): `base` (the pretrained model), `sft` (plain instruction tuning, `lambda_js` 0),
`sara` (each example aligned to its own English anchor's prior), and controls that keep the loss
but change the prior: `sara_shuffled` (another example's prior, a derangement over the groups),
`sara_mean` (the corpus-mean English prior for every example: "route like English" without the
example's content), `sara_topic_shuffled` (another example's prior of the same topic). Related
methods beside SARA: `kl` (the same recipe with Bandarkar et al.'s KL(anchor || target) instead of
JS; lambda not re-tuned) and `steer` (the SFT model, with the clone's questions steered at inference
toward the experts English instruction data uses most; experts per layer and strength from
`arms.STEER_GRID`, chosen per run on the clone's dev items).

Held-out facts are split by fact into dev and test (`testbed.TestbedConfig.dev_fraction`): the
fine-tuning recipe (`Recipe`) is chosen on dev (`experiment.select`), reported numbers are test
numbers. A world is valid when its base model passes `VALIDITY` on dev (rule fixed in advance).
The rule runs right after pretraining, before priors and arms: an invalid world's arms are never
trained (`stop_on_invalid`, the single-world demo: `InvalidWorld` is raised with one line instead);
it is reported and left out of the comparisons. Pretrained worlds are cached under `cache_dir` by
the hash of their config, so reruns skip pretraining. `neurons` adds every run's language neurons against
its world's base model (`experiment.neuron_view`; the report's "Language neurons").
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sara_moe.experiment import neuron_view
from sara_moe.experiment.arms import evaluate_model, knowledge_scores, steered_scores, write_control_priors
from sara_moe.experiment.design import ARMS, CLONE, PRIOR_ARMS, SPLITS, VALIDITY, WORLD_BASE, WORLD_KINDS  # noqa: F401
from sara_moe.experiment.report import comparisons, write_report
from sara_moe.runtime import artifacts


@dataclass
class Recipe:
    """The fine-tuning regime every trained arm shares (chosen on dev: `experiment.select`)."""

    learning_rate: float = 1e-4
    max_steps: int = 120
    batch_size: int = 32
    lambda_js: float = 3.0
    align_layers: list = field(default_factory=lambda: [1, 2])
    lr_scheduler_type: str = "constant"


@dataclass
class ExperimentConfig:
    output_dir: str = "runs/experiment"
    worlds: list = field(default_factory=lambda: ["routed_topic"])
    world_seeds: list = field(default_factory=lambda: [0])
    arms: list = field(default_factory=lambda: ["base", "sft", "sara", "sara_shuffled", "sara_mean"])
    ft_seeds: list = field(default_factory=lambda: [0, 1, 2])
    recipe: Recipe = field(default_factory=Recipe)
    world_overrides: dict = field(default_factory=dict)  # TestbedConfig fields for every world (e.g. CI sizes)
    cache_dir: str | None = None  # pretrained worlds; default <output_dir>/worlds
    keep_models: bool = False  # fine-tuned weights are deleted after evaluation unless kept
    runs_dir: str | None = None  # fine-tuning runs, keyed by arm, FT seed and recipe; default <output_dir>/runs
    validity: dict = field(default_factory=lambda: dict(VALIDITY))
    jobs: int = 1  # fine-tuning runs in parallel worker processes (each single-threaded, so results do not change)
    selected: dict = field(default_factory=dict)  # where the recipe came from (recorded in summary.json)
    stop_on_invalid: bool = False  # raise InvalidWorld when a world fails validity (else skip its arms)
    neurons: bool = False  # count every run's language neurons on the probe texts (experiment.neuron_view)
    neuron_thresholds: dict = field(default_factory=dict)  # neuron_classes.Thresholds fields; empty = the papers'


class InvalidWorld(RuntimeError):
    """A world failed the validity rule right after pretraining; nothing was fine-tuned. The message is one line."""


@contextmanager
def single_thread():
    """Pretraining, fine-tuning and evaluation run on one CPU thread: the numbers then do not depend on
    the machine's core count (matmul reductions split by thread differ in the last bits), and
    `jobs` worker processes give the parallelism instead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _log(msg: str, start: float) -> None:
    print(f"[sara experiment {time.time() - start:7.1f}s] {msg}", flush=True)


def world_config(kind: str, seed: int, overrides: dict | None = None):
    from sara_moe.testbed.build import TestbedConfig

    if kind not in WORLD_KINDS:
        raise ValueError(f"world kind {kind!r}: choose one of {sorted(WORLD_KINDS)}")
    return TestbedConfig(**{**WORLD_BASE, **WORLD_KINDS[kind], **(overrides or {}), "seed": seed})


def config_hash(cfg) -> str:
    return artifacts.sha(asdict(cfg), 10)


def prepare_world(kind: str, seed: int, overrides: dict, cache_dir: Path, start: float) -> Path:
    """Built testbed + pretrained base, cached by config hash (a valid world's priors and routing
    analysis come after the validity check: `finish_world`)."""
    from sara_moe.testbed.build import build
    from sara_moe.testbed.pretrain import pretrain

    cfg = world_config(kind, seed, overrides)
    folder = cache_dir / f"{kind}-s{seed}-{config_hash(cfg)}"
    if (folder / "base" / "pretrain_log.json").is_file():  # published atomically: a finished pretraining
        _log(f"{kind} world seed {seed}: cached in {folder}", start)
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier attempt
    folder.mkdir(parents=True)
    build(cfg, folder / "testbed")
    log = pretrain(folder / "testbed", folder / "base", cfg, progress=False)
    known = log.get("final_knowledge")
    _log(f"{kind} world seed {seed}: pretrained {log['steps']} steps in {log['seconds']} s, loss "
         f"{log['final_loss']:.3f}, route loss {log['final_route_loss']}"
         + (f", English dev facts known {json.dumps(known)}" if known else ""), start)
    return folder


def finish_world(folder: Path, start: float) -> Path:
    """English priors + base routing analysis of a world that passed validity (cached: ready.json)."""
    from sara_moe.analysis.analyze import analyze
    from sara_moe.priors import extract_priors

    if (folder / "ready.json").is_file():
        return folder
    extract_priors(str(folder / "base"), str(folder / "testbed" / "instruct.jsonl"), folder / "priors.safetensors",
                   device="cpu", progress=False, overwrite=True)
    analyze(str(folder / "base"), str(folder / "testbed" / "probe.jsonl"), str(folder / "analysis"),
            langs=[CLONE, "en_other"], device="cpu", overwrite=True)
    artifacts.write_json(folder / "ready.json", {"folder": folder.name})
    _log(f"{folder.name}: priors and routing analysis ready", start)
    return folder


# ----------------------------------------------------------------------------- evaluation


def world_items(testbed: Path) -> list[dict]:
    """Held-out fact items of both splits: {key, lang, split, part, item}."""
    from sara_moe.evaluation.items import read_items

    rows = []
    for split in SPLITS:
        path = testbed / f"eval_mc_{split}.jsonl"
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        _, items = read_items(path, "mc")
        for record, item in zip(records, items):
            rows.append({"key": f"{item.lang}|{item.id}", "lang": item.lang, "split": split, "part": record["part"],
                         "item": item})
    return rows


def clone_js(analysis: dict) -> dict:
    metrics = analysis["metrics"]["js_pair_mean"]
    return {"layers": analysis["moe_layers"], CLONE: metrics[CLONE], "en_other": metrics.get("en_other")}


# ----------------------------------------------------------------------------- one arm, one world


def run_name(arm: str, ft_seed: int, recipe: Recipe) -> str:
    """Run folder name: arm, FT seed and a hash of the recipe fields the arm depends on, so a cached
    result is reused only for exactly the same fine-tuning (SFT does not depend on lambda or layers)."""
    if arm == "base":
        return "base"
    fields_ = asdict(recipe)
    if arm == "sft":
        fields_ = {k: v for k, v in fields_.items() if k not in ("lambda_js", "align_layers")}
    if arm == "steer":  # SFT weights; the layers are where it steers
        fields_ = {k: v for k, v in fields_.items() if k != "lambda_js"}
    key = artifacts.sha(fields_, 8)
    return f"{arm}-ft{ft_seed}-{key}"


def run_arm(world: Path, arm: str, ft_seed: int, recipe: Recipe, out: Path, items: list[dict],
            keep_model: bool = False, neurons: dict | None = None, base_neurons: dict | None = None) -> dict:
    """Fine-tune (unless `base`), evaluate every held-out item and measure routing; the run's record.
    A finished run (its `result.json`) is read back instead of being redone (marked `cached`). The base
    record also carries `knowledge` (English facts as pretraining sentences, for the validity rule).
    `neurons` (thresholds; None: off): and its language neurons, against `base_neurons` (`neuron_view.attach`)."""
    result_file = out / "result.json"
    model_dir, probe = (world / "base" if arm == "base" else out / "model"), world / "testbed" / "probe.jsonl"
    if result_file.is_file():
        record = {**json.loads(result_file.read_text()), "cached": True}
        if neurons is not None:
            neuron_view.attach(record, model_dir, probe, base_neurons, result_file, neurons)
    else:
        record = _fresh_run(world, arm, ft_seed, recipe, out, items, keep_model, neurons)
        if neurons is not None:
            neuron_view.attach(record, model_dir, probe, base_neurons, given=neurons)
        artifacts.write_json(result_file, record, overwrite=False)
    if arm == "base":  # cached apart from result.json, so base runs recorded before it still load
        knowledge_file = out / "knowledge.json"
        if not knowledge_file.is_file():
            artifacts.write_json(knowledge_file, knowledge_scores(world / "base", items))
        record["knowledge"] = json.loads(knowledge_file.read_text())
    return record


def _fresh_run(world: Path, arm: str, ft_seed: int, recipe: Recipe, out: Path, items: list[dict],
               keep_model: bool, neurons: dict | None = None) -> dict:
    started = time.time()
    found = None
    if arm == "base":  # before validity, so before the routing analysis: `_run_grid` adds its routing
        scores = evaluate_model(world / "base", items)
        js = None
    else:
        from sara_moe.analysis.analyze import analyze
        from sara_moe.train import SaraConfig, train

        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        priors = world / "priors.safetensors"
        if arm in PRIOR_ARMS and PRIOR_ARMS[arm] != "own":
            priors = write_control_priors(priors, PRIOR_ARMS[arm], ft_seed, out / "priors_control.safetensors")
        train(SaraConfig(output_dir=str(out / "model"), model_name_or_path=str(world / "base"),
                         data=str(world / "testbed" / "instruct.jsonl"), priors=str(priors),
                         lambda_js=0.0 if arm in ("sft", "steer") else recipe.lambda_js,
                         align_layers=recipe.align_layers, divergence="kl" if arm == "kl" else "js",
                         train_anchor=True, max_steps=recipe.max_steps,
                         per_device_train_batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
                         lr_scheduler_type=recipe.lr_scheduler_type, save_strategy="no", report_to="none",
                         seed=ft_seed, data_seed=ft_seed, logging_steps=10, dataloader_num_workers=0,
                         max_length=64, disable_tqdm=True, use_cpu=True,
                         gradient_checkpointing=False))  # TRL turns it on by default; a 2M model needs no recompute
        steer = steered_scores(out / "model", world, recipe.align_layers, items) if arm == "steer" else None
        scores = steer.pop("scores") if steer else evaluate_model(out / "model", items)
        js = None if steer else clone_js(analyze(str(out / "model"), str(world / "testbed" / "probe.jsonl"), str(out / "analysis"),
                              langs=[CLONE, "en_other"], device="cpu", hidden=False, progress=False, plots=False))
        if neurons is not None and arm != "steer":  # before the weights go
            found = neuron_view.count(out / "model", world / "testbed" / "probe.jsonl", neurons)
        if not keep_model:
            for weights in (out / "model").glob("*.safetensors"):
                weights.unlink()
    return {"arm": arm, "ft_seed": ft_seed, "recipe": asdict(recipe), "scores": scores, "routing_js": js,
            "seconds": round(time.time() - started, 1), **({"steer": steer} if arm == "steer" else {}),
            **({"neurons": found} if found else {})}


def validity(base_scores: dict, items: list[dict], rule: dict | None = None, knowledge: dict | None = None) -> dict:
    """The validity rule (default VALIDITY) on the base model's dev items: {valid, reasons, ...}.
    `knowledge`: the base model's English scores in the pretraining form (needed by `en_knowledge_min`)."""
    rule = rule or VALIDITY
    def acc(scores, lang, split):
        keys = [r["key"] for r in items if r["lang"] == lang and r["split"] == split and r["part"] == "dev"]
        return sum(scores[k] for k in keys) / len(keys)

    en_shared, clone_en_only = acc(base_scores, "en", "shared"), acc(base_scores, CLONE, "en_only")
    known = {split: acc(knowledge, "en", split) for split in SPLITS} if knowledge else {}
    reasons = []
    if "en_knowledge_min" in rule:
        if not known:
            raise ValueError("validity rule en_knowledge_min needs the base model's knowledge scores")
        low = [f"{100 * value:.1f}% ({split})" for split, value in known.items() if value < rule["en_knowledge_min"]]
        if low:
            reasons.append(f"base model knows {' and '.join(low)} of English dev facts as pretraining sentences, "
                           f"< {100 * rule['en_knowledge_min']:.0f}%: it did not learn English")
    if "en_shared_min" in rule and en_shared < rule["en_shared_min"]:
        reasons.append(f"base English shared-fact dev accuracy {100 * en_shared:.1f} < "
                       f"{100 * rule['en_shared_min']:.0f} (templated; the rule before 2026-11-26)")
    if clone_en_only > rule["clone_en_only_max"]:
        reasons.append(f"base clone English-only dev accuracy {100 * clone_en_only:.1f} > "
                       f"{100 * rule['clone_en_only_max']:.0f}: no room for a transfer gain")
    return {"valid": not reasons, "reasons": reasons, "en_shared_dev": en_shared, "clone_en_only_dev": clone_en_only,
            **{f"en_{split}_known_dev": value for split, value in known.items()}}


# ----------------------------------------------------------------------------- the whole grid


def accuracy_rows(world: str, world_seed: int, record: dict, items: list[dict], part: str) -> list[dict]:
    rows = []
    for split in SPLITS:
        for lang in sorted({r["lang"] for r in items}):
            keys = [r["key"] for r in items if r["lang"] == lang and r["split"] == split and r["part"] == part]
            if keys:
                rows.append({"world": world, "world_seed": world_seed, "arm": record["arm"],
                             "ft_seed": record["ft_seed"], "split": split, "lang": lang,
                             "acc": sum(record["scores"][k] for k in keys) / len(keys), "n": len(keys)})
    return rows


def _run_grid(cfg: ExperimentConfig, summary: dict, item_scores: list, cache: Path, runs_dir: Path, start: float,
              pool=None) -> None:
    """Phases, each spread over `pool` when given: pretrain every world, evaluate every base model and
    apply the validity rule (an invalid world stops here: `InvalidWorld` under `stop_on_invalid`, else
    its arms are skipped), priors and routing analysis of the valid worlds, then every (valid world,
    arm, FT seed) run; then the summary rows in a fixed order."""
    mapper = pool.map if pool is not None else map
    worlds = [(kind, seed) for kind in cfg.worlds for seed in cfg.world_seeds]
    world_jobs = [(kind, seed, cfg.world_overrides, cache, start) for kind, seed in worlds]
    if pool is not None and len(worlds) == 1:
        # one world: pretrain it here (this process has torch loaded) while every worker imports the
        # evaluation and fine-tuning stack (~8 s each), which is then off the critical path
        for _ in range(cfg.jobs):
            pool.submit(_warm_worker)
        folders = [_prepare_world_job(world_jobs[0])]
    else:
        folders = list(mapper(_prepare_world_job, world_jobs))
    items = {w: world_items(folder / "testbed") for w, folder in zip(worlds, folders)}
    world_runs = {w: runs_dir / f"{w[0]}-s{w[1]}-{folder.name.rsplit('-', 1)[-1]}" for w, folder in zip(worlds, folders)}
    base_jobs = [(folder, "base", 0, cfg.recipe, world_runs[w] / "base", items[w]) for w, folder in zip(worlds, folders)]
    bases = dict(zip(worlds, mapper(_run_arm_job, base_jobs)))
    verdicts = {}
    for w in worlds:
        verdicts[w] = validity(bases[w]["scores"], items[w], cfg.validity, knowledge=bases[w]["knowledge"])
        _log(f"{w[0]} world seed {w[1]}: {'valid' if verdicts[w]['valid'] else 'INVALID'} (base dev: English facts "
             f"known {verdicts[w].get('en_shared_known_dev', float('nan')):.3f} / "
             f"{verdicts[w].get('en_en_only_known_dev', float('nan')):.3f}, en shared {verdicts[w]['en_shared_dev']:.3f}, "
             f"clone en_only {verdicts[w]['clone_en_only_dev']:.3f})", start)
    invalid = [w for w in worlds if not verdicts[w]["valid"]]
    if invalid and cfg.stop_on_invalid:
        kind, seed = invalid[0]
        raise InvalidWorld(f"{kind} world seed {seed} is invalid: {'; '.join(verdicts[invalid[0]]['reasons'])}; "
                           f"stopped before priors and arms (nothing fine-tuned); try another world seed, "
                           f"e.g. --seed {seed + 1}")
    valid = [(w, folder) for w, folder in zip(worlds, folders) if verdicts[w]["valid"]]
    list(mapper(_finish_world_job, [(folder, start) for _, folder in valid]))
    for w, folder in valid:
        bases[w]["routing_js"] = clone_js(json.loads((folder / "analysis" / "analysis.json").read_text()))
        if cfg.neurons:  # after validity, like the routing analysis: an invalid world's base is not counted
            with single_thread():
                neuron_view.attach(bases[w], folder / "base", folder / "testbed" / "probe.jsonl", None,
                                   world_runs[w] / "base" / "result.json", cfg.neuron_thresholds)
    arms = {w: [a for a in cfg.arms if a != "sara_topic_shuffled" or WORLD_KINDS[w[0]].get("route_by") == "lang_topic"]
            for w in worlds}
    jobs = [(w, (folder, arm, ft_seed, cfg.recipe, world_runs[w] / run_name(arm, ft_seed, cfg.recipe), items[w],
                 cfg.keep_models, cfg.neuron_thresholds if cfg.neurons else None, bases[w].get("neurons")))
            for w, folder in valid for arm in arms[w] if arm != "base"
            for ft_seed in cfg.ft_seeds]
    done = {}
    for (w, job), record in zip(jobs, mapper(_run_arm_job, [job for _, job in jobs])):
        done[(w, job[1], job[2])] = record
        _log(f"{w[0]} s{w[1]} {job[1]} ft{job[2]}: {record['seconds']} s" + (" (cached)" if record.get("cached") else ""),
             start)
    records = list(bases.values()) + list(done.values())
    summary["runs_read_back"] = {"cached": sum(bool(r.get("cached")) for r in records), "total": len(records)}
    for (kind, world_seed), folder in zip(worlds, folders):
        w, base, verdict = (kind, world_seed), bases[(kind, world_seed)], verdicts[(kind, world_seed)]
        skipped = [] if verdict["valid"] else ["its arms were not run: the validity check comes right after pretraining"]
        summary["worlds"].append({"world": kind, "world_seed": world_seed, **verdict,
                                  "reasons": verdict["reasons"] + skipped, "arms_run": verdict["valid"],
                                  "folder": str(folder)})
        meta = {r["key"]: (r["lang"], r["split"], r["part"]) for r in items[w]}
        for arm in arms[w] if verdict["valid"] else ["base"]:
            records = [base] if arm == "base" else [done[(w, arm, ft_seed)] for ft_seed in cfg.ft_seeds]
            for record in records:
                summary["runs"] += accuracy_rows(kind, world_seed, record, items[w], "test")
                summary["dev_runs"] += accuracy_rows(kind, world_seed, record, items[w], "dev")
                item_scores.append({"world": kind, "world_seed": world_seed, "arm": arm,
                                    "ft_seed": record["ft_seed"], "scores": record["scores"], "meta": meta})
            if cfg.neurons and verdict["valid"]:
                summary["neuron_runs"] += [neuron_view.row(kind, world_seed, record) for record in records]
            js = [r["routing_js"] for r in records]
            if js[0] is None:  # steer: routing under steering is not measured; an invalid world: not analysed
                continue
            summary["routing"].append({
                "world": kind, "world_seed": world_seed, "arm": arm, "layers": js[0]["layers"],
                "clone_js": [sum(x[CLONE][i] for x in js) / len(js) for i in range(len(js[0]["layers"]))],
                "en_other_js": js[0]["en_other"]})


def _warm_worker() -> None:
    import sara_moe.analysis.analyze  # noqa: F401
    import sara_moe.evaluation.evaluate  # noqa: F401
    import sara_moe.train  # noqa: F401


def _prepare_world_job(job: tuple) -> Path:
    with single_thread():
        return prepare_world(*job)


def _finish_world_job(job: tuple) -> Path:
    with single_thread():
        return finish_world(*job)


def _run_arm_job(job: tuple) -> dict:
    with single_thread():
        return run_arm(*job)


def run_experiment(cfg: ExperimentConfig, progress_start: float | None = None) -> dict:
    """Run every (world, world seed, arm, FT seed); write `summary.json` and `report.md`; return the summary."""
    start = progress_start or time.time()
    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"arms {unknown}: choose from {list(ARMS)}")
    neuron_view.thresholds(cfg.neuron_thresholds)  # a bad key fails before any training
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "worlds"
    runs_dir = Path(cfg.runs_dir) if cfg.runs_dir else out / "runs"
    artifacts.write_json(out / "experiment_config.json", asdict(cfg))  # rewritten by a rerun (runs are cached)
    summary = {"runs": [], "dev_runs": [], "worlds": [], "routing": [], "comparisons": [],
               "selected": {"recipe": asdict(cfg.recipe), **cfg.selected}, "config": asdict(cfg),
               **({"neuron_runs": []} if cfg.neurons else {})}  # per run: its neuron counts (neuron_view.row)
    item_scores = []  # per run: {world, world_seed, arm, ft_seed, scores {key: 0/1}, meta} for the paired tests
    if cfg.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(cfg.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            _run_grid(cfg, summary, item_scores, cache, runs_dir, start, pool)
    else:
        _run_grid(cfg, summary, item_scores, cache, runs_dir, start)
    summary["comparisons"] = comparisons(summary, item_scores)
    summary["dev_comparisons"] = comparisons(summary, item_scores, part="dev")  # what recipe selection reads
    if cfg.neurons:
        summary["neurons"] = neuron_view.neuron_block(summary["neuron_runs"], cfg.recipe.align_layers)
    summary["seconds"] = round(time.time() - start, 1)
    summary["metadata"] = artifacts.run_metadata(seed=cfg.world_seeds[0] if cfg.world_seeds else None, device="cpu")
    write_report(summary, out)
    _log(f"done in {summary['seconds']} s; report: {out / 'report.md'}", start)
    return summary
