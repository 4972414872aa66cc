"""MGSM in Hindi and Nepali for lm-eval: the dataset is a file the user supplies (lm-eval ships none).

    SARA_MGSM_HI=data/mgsm_hi.tsv SARA_MGSM_NE=data/mgsm_ne.tsv \\
        sara eval --model PATH --output_dir out --backend lm-eval --tasks mgsm_direct_hi,mgsm_direct_ne
    lm_eval --model hf --model_args pretrained=PATH --tasks mgsm_direct_hi \\
        --include_path src/sara_moe/evaluation/lm_eval_tasks --metadata '{"mgsm_hi": "data/mgsm_hi.tsv"}'

`mgsm_direct_hi.yaml` / `mgsm_direct_ne.yaml` name `load_hi` / `load_ne` as their
`custom_dataset`; lm-eval calls it with the task's metadata (`--metadata`, or `TaskManager(metadata=...)`)
and `dataset_kwargs` as keyword arguments. The file is found, first to last, in
`dataset_kwargs.data_files` (a group member's override), metadata key `mgsm_<lang>`, or the
environment variable `SARA_MGSM_<LANG>`. Accepted formats are MGSM's own: the release's TSV
(`mgsm_<lang>.tsv`: question, tab, numeric answer, no header) or the columns of the hub copy
`juletxara/mgsm` (`question`, `answer_number`; `answer`, `equation_solution` optional) as
JSON/JSONL, CSV or parquet. This file is loaded by lm-eval by path, so it imports nothing from sara_moe.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

COLUMNS = ("question", "answer", "answer_number", "equation_solution")
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _path(lang: str, kwargs: dict) -> Path:
    env = f"SARA_MGSM_{lang.upper()}"
    given = kwargs.get("data_files") or kwargs.get(f"mgsm_{lang}") or os.environ.get(env)
    if isinstance(given, dict):  # data_files: {test: PATH}
        given = given.get("test")
    if not given:
        raise ValueError(f"mgsm_direct_{lang}: no dataset; lm-eval has no MGSM in {lang!r}, so set {env}=PATH "
                         f"(MGSM's TSV or JSONL with question/answer_number), or lm_eval --metadata "
                         f"'{{\"mgsm_{lang}\": \"PATH\"}}'")
    path = Path(str(given)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"mgsm_direct_{lang}: dataset file {path} does not exist (from {env}, "
                                f"metadata mgsm_{lang} or dataset_kwargs.data_files)")
    return path


def _read_tsv(path: Path) -> dict:
    rows = {key: [] for key in COLUMNS}
    with open(path, encoding="utf-8", newline="") as fh:
        for line_no, fields in enumerate(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(f"{path}:{line_no}: MGSM TSV rows are question<TAB>answer, got {len(fields)} fields")
            try:
                number = float(fields[1].replace(",", ""))
            except ValueError:
                raise ValueError(f"{path}:{line_no}: answer {fields[1]!r} is not a number") from None
            rows["question"].append(fields[0])
            rows["answer"].append(None)
            rows["answer_number"].append(int(number) if number.is_integer() else number)
            rows["equation_solution"].append(None)
    return rows


def load_mgsm(lang: str, **kwargs):
    """DatasetDict {"test": ...} with MGSM's columns, read from the file the user supplied for `lang`."""
    import datasets

    path = _path(lang, kwargs)
    if path.suffix.lower() == ".tsv":
        test = datasets.Dataset.from_dict(_read_tsv(path))
    elif path.suffix.lower() in _BUILDERS:
        test = datasets.load_dataset(_BUILDERS[path.suffix.lower()], data_files={"test": str(path)}, split="test")
        missing = [c for c in ("question", "answer_number") if c not in test.column_names]
        if missing:
            raise ValueError(f"{path}: column {missing[0]!r} is missing; MGSM rows need question and answer_number")
        for column in ("answer", "equation_solution"):  # the direct prompt reads `answer` (None on MGSM's test)
            if column not in test.column_names:
                test = test.add_column(column, [None] * len(test))
    else:
        raise ValueError(f"{path}: unknown MGSM file type; give .tsv (MGSM's release) or .jsonl/.json/.csv/.parquet")
    return datasets.DatasetDict({"test": test})


def load_hi(**kwargs):
    return load_mgsm("hi", **kwargs)


def load_ne(**kwargs):
    return load_mgsm("ne", **kwargs)
