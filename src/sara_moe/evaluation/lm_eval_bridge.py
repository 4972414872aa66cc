"""lm-evaluation-harness bridge for `sara eval --backend lm-eval` (needs `pip install sara-moe[eval]`).

    sara eval --model PATH --output-dir out --backend lm-eval --tasks global_mmlu_full_sw,belebele_swh_Latn
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


def _lang_of_task(name: str) -> str:
    """global_mmlu_full_sw -> sw, belebele_swh_Latn -> swh_Latn, mgsm_direct_sw -> sw, sara_mc_sw -> sw."""
    for pattern in (r"^belebele_(.+)$", r"^global_mmlu(?:_full)?_([a-z]{2,3}(?:[-_][A-Za-z]+)?)$",
                    r"^mgsm_(?:direct|native_cot|en_cot)_(.+)$", r"^sara_(?:mc|gen)_(.+)$"):
        match = re.match(pattern, name)
        if match:
            return match.group(1)
    return name


def _metric_values(task_result: dict) -> dict[str, float]:
    """lm-eval's "acc,none" / "exact_match,flexible-extract" keys -> {"acc": ..., "exact_match": ...}."""
    values = {}
    for key, value in task_result.items():
        if "," not in key or "stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, _filter = key.split(",", 1)
        values.setdefault(metric, float(value))
    return values


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
        if config.tasks:
            task_specs, lang_by_task = list(config.tasks), {name: _lang_of_task(name) for name in config.tasks}
        else:
            configs = local_task_configs(items, task, Path(folder), config.max_new_tokens, config.temperature)
            task_specs = list(configs.values())
            lang_by_task = {cfg["task"]: lang for lang, cfg in configs.items()}
        output = simple_evaluate(model=lm, tasks=task_specs, task_manager=TaskManager(include_path=str(TASKS_DIR)),
                                 batch_size=config.batch_size, log_samples=True, bootstrap_iters=0,
                                 random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                 fewshot_random_seed=seed)
    scored = {**output.get("results", {}), **output.get("groups", {})}
    per_language, rows, metrics = {}, [], []
    for name, lang in lang_by_task.items():
        if name not in scored:
            raise ValueError(f"lm-eval returned no results for task {name!r} (got {sorted(scored)})")
        values = _metric_values(scored[name])
        samples = _leaf_samples(output, name)
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
    return per_language, rows, info


def _leaf_samples(output: dict, name: str) -> list[tuple[str, dict]]:
    """(leaf task, sample) pairs of a task or, recursively, of a group's subtasks."""
    samples = output.get("samples", {})
    if name in samples:
        return [(name, s) for s in samples[name]]
    return [pair for sub in output.get("group_subtasks", {}).get(name, []) for pair in _leaf_samples(output, sub)]


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
