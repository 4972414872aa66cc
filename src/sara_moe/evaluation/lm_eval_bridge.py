"""lm-evaluation-harness bridge for `sara eval --backend lm-eval` (needs `pip install sara-moe[eval]`).

    sara eval --model PATH --output-dir out --backend lm-eval --tasks global_mmlu_full_sw,belebele_swh_Latn
    sara eval --model PATH --output-dir out --backend lm-eval --tasks sara_paper      # the paper's 15 tasks
    sara eval --model PATH --output-dir out --backend lm-eval --tasks my_list.yaml    # a list of your own
    sara eval --model PATH --data examples/eval_mc.jsonl --output-dir out --backend lm-eval

    from sara_moe.evaluation.lm_eval_bridge import run_lm_eval, local_task_configs

The already-loaded model (base + adapter) is wrapped in lm-eval's `HFLM(pretrained=model,
tokenizer=tokenizer)` and run through `simple_evaluate`. With `--tasks`, lm-eval's own task
registry is used (datasets come from the hub: online users). Without it, `--data` items run
offline through the task YAMLs shipped in `sara_moe/evaluation/lm_eval_tasks/` (`sara_mc.yaml`,
`sara_gen.yaml`): one inline task `sara_<mc|gen>_<lang>` per language, reading that
language's items from a temporary JSONL (`dataset_path: json`). Generations are re-scored with
sara-moe's numeric extraction, so `exact_match` means the same thing in both backends.
Results come back in sara-moe's `per_language` format; lm-eval's own numbers stay under `lm_eval`.

A `--tasks` entry may be a task list: a group YAML whose `task` is a list, shipped here by name
(`sara_paper`: Global-MMLU, Belebele and MGSM in hi, ne, bn, te, sw; MGSM hi/ne read files the
user supplies, see `lm_eval_tasks/mgsm_local.py`) or given as a path, whose folder joins lm-eval's
include path (as `lm_eval --include_path DIR --tasks NAME`). lm-eval runs the list itself, so a member written as a dict (`{group: global_mmlu_full_hi, dataset_path: parquet, ...}`)
carries its overrides down to every subtask: that is how a list points at local copies of the
datasets. Each member is reported on its own: `per_language` keys are languages
(`global_mmlu_full_sw` -> `sw`, `belebele_swh_Latn` -> `swh_Latn`) when every language occurs once,
else the task names themselves; `benchmark_means` is the mean over languages per benchmark
(the paper's 5-language averages). A task scored under several filters (MGSM: remove_whitespace,
flexible-extract) is reported under flexible-extract, sara-moe's own numeric matching; the other
filters stay under `lm_eval.results`. Registry tasks generate as their YAML says: lm-eval 0.4.13's
HFLM caps generation at 256 tokens unless the task sets `max_gen_toks`, whatever `--max_new_tokens` says.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import yaml

from sara_moe.evaluation.items import EvalItem, by_language, extract_number, numbers_match

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError("--backend lm-eval needs lm-evaluation-harness: pip install 'sara-moe[eval]' "
                         "(lm-eval==0.4.13)") from None


def local_task_configs(items: list[EvalItem], task: str, folder: Path, max_new_tokens: int = 32,
                       temperature: float = 0.0) -> dict[str, dict]:
    """{lang: inline lm-eval task config} built from the shipped YAML, one JSONL per language in `folder`."""
    base = yaml.safe_load((TASKS_DIR / f"sara_{task}.yaml").read_text())
    configs = {}
    for lang, lang_items in by_language(items).items():
        path = folder / f"{lang}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for item in lang_items:
                record = {"id": item.id, "lang": item.lang, "question": item.question, "answer": item.answer}
                if task == "mc":
                    record.update(choices=item.choices, passage=item.passage)
                else:
                    record["answer"] = str(item.answer)
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        config = {**base, "task": f"sara_{task}_{lang}", "dataset_kwargs": {"data_files": {"test": str(path)}}}
        if task == "gen":
            gen = dict(config["generation_kwargs"], max_gen_toks=max_new_tokens)
            if temperature > 0:
                gen.update(do_sample=True, temperature=temperature)
            config["generation_kwargs"] = gen
        configs[lang] = config
    return configs


class _AnyTagLoader(yaml.SafeLoader):
    """Reads lm-eval YAML (its `!function` tags become None): only the structure is needed here."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_list_members(spec: str) -> list[str] | None:
    """The member names of a task list (a shipped list name or a YAML path); a single task YAML path
    gives its task name; None when `spec` is neither (a plain lm-eval task or group name)."""
    path = TASKS_DIR / f"{spec}.yaml"
    if not path.is_file():
        path = Path(spec)
        if path.suffix not in (".yaml", ".yml"):
            return None
        if not path.is_file():
            raise FileNotFoundError(f"--tasks {spec}: no such task list file")
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=_AnyTagLoader) or {}
    members = config.get("task") if isinstance(config, dict) else None
    if isinstance(members, str) and "group" not in config:
        return [members]
    if not (isinstance(members, list) and config.get("group")):
        return None
    names = []
    for member in members:
        name = member if isinstance(member, str) else (member.get("task") or member.get("group")) \
            if isinstance(member, dict) else None
        if not isinstance(name, str):
            raise ValueError(f"{path}: task list member {member!r} names no task or group (key task or group)")
        names.append(name)
    return names


def _result_keys(names: list[str]) -> dict[str, str]:
    """{task name: per_language key}: its language, or every task's name when two tasks share a language."""
    langs = [_lang_of_task(name) for name in names]
    return dict(zip(names, langs if len(set(langs)) == len(langs) else names))


def _benchmark_of_task(name: str) -> str:
    """global_mmlu_full_sw -> global_mmlu_full, belebele_swh_Latn -> belebele, mgsm_direct_sw -> mgsm_direct."""
    lang = _lang_of_task(name)
    return name[:-len(lang) - 1] if lang != name and name.endswith("_" + lang) else name


def benchmark_means(per_language: dict, key_by_task: dict[str, str]) -> dict:
    """{benchmark: {"metric", "mean" over its languages, "tasks"}}: the paper's per-benchmark averages."""
    grouped: dict[str, list[str]] = {}
    for name in key_by_task:
        grouped.setdefault(_benchmark_of_task(name), []).append(name)
    means = {}
    for benchmark, names in grouped.items():
        entries = [per_language[key_by_task[name]] for name in names]
        metric = next((m for m in ("acc", "exact_match") if all(m in e for e in entries)), None)
        if metric is not None:
            means[benchmark] = {"metric": metric, "mean": sum(e[metric] for e in entries) / len(entries),
                                "tasks": names}
    return means


def _lang_of_task(name: str) -> str:
    """global_mmlu_full_sw -> sw, belebele_swh_Latn -> swh_Latn, mgsm_direct_sw -> sw, sara_mc_sw -> sw."""
    for pattern in (r"^belebele_(.+)$", r"^global_mmlu(?:_full)?_([a-z]{2,3}(?:[-_][A-Za-z]+)?)$",
                    r"^mgsm_(?:direct|native_cot|en_cot)_(.+)$", r"^sara_(?:mc|gen)_(.+)$"):
        match = re.match(pattern, name)
        if match:
            return match.group(1)
    return name


PREFERRED_FILTER = "flexible-extract"  # lm-eval's numeric extraction: the metric sara-moe's own backend computes


def _metric_values(task_result: dict) -> tuple[dict[str, float], str | None]:
    """lm-eval's "acc,none" / "exact_match,flexible-extract" keys -> ({"acc": ..., "exact_match": ...}, filter):
    one filter per task, flexible-extract where the task has it, else the first."""
    by_filter: dict[str, dict[str, float]] = {}
    for key, value in task_result.items():
        if "," not in key or "stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, filter_name = key.split(",", 1)
        by_filter.setdefault(filter_name, {})[metric] = float(value)
    if not by_filter:
        return {}, None
    chosen = PREFERRED_FILTER if PREFERRED_FILTER in by_filter else next(iter(by_filter))
    return by_filter[chosen], chosen


def _rescore_sample(sample: dict, task: str) -> dict:
    doc = sample["doc"]
    row = {"id": str(doc.get("id", sample.get("doc_id"))), "lang": doc.get("lang"), "answer": doc.get("answer")}
    if task == "mc":
        lls = [float(resp[0][0]) for resp in sample["resps"]]
        pred = max(range(len(lls)), key=lambda k: lls[k])
        row.update(answer=int(doc["answer"]), loglikelihoods=lls, prediction=pred, acc=float(sample["acc"]),
                   acc_norm=float(sample.get("acc_norm", sample["acc"])))
    else:
        text = sample["resps"][0][0]
        number = extract_number(text)
        row.update(generation=text, prediction=number, exact_match=float(numbers_match(number, doc["answer"])))
    return row


def run_lm_eval(config, model, tokenizer, items: list[EvalItem], task: str | None) -> tuple[dict, list, dict]:
    """(per_language, sample rows, extra results fields) from lm-eval on `config.tasks` or the items."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size,
              max_gen_toks=config.max_new_tokens)
    seed = config.seeds[0]
    with tempfile.TemporaryDirectory(prefix="sara_lm_eval_") as folder:
        include = [str(TASKS_DIR)]
        if config.tasks:  # lists are run by lm-eval as one group and reported per member
            lang_by_task = _result_keys([name for spec in config.tasks for name in task_list_members(spec) or [spec]])
            task_specs = []
            for name, folder in map(_lm_eval_spec, config.tasks):
                task_specs.append(name)
                include += [str(folder)] if folder is not None and str(folder) not in include else []
        else:
            configs = local_task_configs(items, task, Path(folder), config.max_new_tokens, config.temperature)
            task_specs = list(configs.values())
            lang_by_task = {cfg["task"]: lang for lang, cfg in configs.items()}
        output = simple_evaluate(model=lm, tasks=task_specs, task_manager=TaskManager(include_path=include),
                                 batch_size=config.batch_size, log_samples=True, bootstrap_iters=0,
                                 random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                 fewshot_random_seed=seed)
    scored = {**output.get("results", {}), **output.get("groups", {})}
    per_language, rows, metrics = {}, [], []
    for name, lang in lang_by_task.items():
        if name not in scored:
            raise ValueError(f"lm-eval returned no results for task {name!r} (got {sorted(scored)})")
        values, filter_name = _metric_values(scored[name])
        samples = [(leaf, s) for leaf, s in _leaf_samples(output, name)
                   if filter_name is None or s.get("filter", filter_name) == filter_name]
        if config.tasks:  # registry tasks: lm-eval's per-sample scores, items identified by subtask/doc_id
            task_rows = [{"task": leaf, "lang": lang, "id": f"{leaf}/{s.get('doc_id')}", "target": s.get("target"),
                          "prediction": s.get("filtered_resps"),
                          **{m: float(s[m]) for m in values if isinstance(s.get(m), (int, float))}}
                         for leaf, s in samples]
        else:
            task_rows = [_rescore_sample(s, task) for _, s in samples]
        if not config.tasks and task == "gen":  # one metric definition for both backends
            values = {"exact_match": sum(r["exact_match"] for r in task_rows) / len(task_rows)}
        if not config.tasks and task == "mc" and not any(i.passage for i in items):
            values.pop("acc_norm", None)
        n = len(task_rows) or int(output.get("n-samples", {}).get(name, {}).get("effective", 0))
        per_language[lang] = {**values, "std": {m: 0.0 for m in values}, "n": n,
                              "per_seed": [{"seed": seed, **values}]}
        metrics += [m for m in values if m not in metrics]
        rows.extend({**row, "seed": seed} for row in task_rows)
    info = {"task": task or "lm-eval", "metrics": metrics, "seeds": [seed], "steer": None,
            "lm_eval": {"tasks": list(lang_by_task), "results": {k: scored[k] for k in lang_by_task},
                        "version": _lm_eval_version()}}
    if config.tasks:
        info["benchmark_means"] = benchmark_means(per_language, lang_by_task)
    return per_language, rows, info


def _lm_eval_spec(spec: str) -> tuple[str, Path | None]:
    """(the name lm-eval is handed, a folder to add to its include path) for a `--tasks` entry. A YAML
    path runs as lm-eval's own `--include_path DIR --tasks NAME` does: lm-eval 0.4.13 misnames a group
    given as a file path or as a dict (its `task` list becomes the name, or overrides every child)."""
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml") or (TASKS_DIR / f"{spec}.yaml").is_file():
        return spec, None
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=_AnyTagLoader) or {}
    name = (config.get("group") or config.get("task")) if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"--tasks {spec}: the file names no task or group (YAML key group or task)")
    return name, path.resolve().parent


def _leaf_samples(output: dict, name: str) -> list[tuple[str, dict]]:
    """(leaf task, sample) pairs of a task or, recursively, of a group's subtasks."""
    samples = output.get("samples", {})
    if name in samples:
        return [(name, s) for s in samples[name]]
    return [pair for sub in output.get("group_subtasks", {}).get(name, []) for pair in _leaf_samples(output, sub)]


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
