"""Eval items: reading and validating JSONL sets, lm-eval-style prompts, numeric answer extraction.

    from sara_moe.evaluation.items import read_items, mc_prompt, gen_prompt, extract_number, numbers_match
    task, items = read_items("examples/eval_mc.jsonl")          # task inferred: "mc" or "gen"
    mc_prompt(items[0])      # "{question}\nA. {a}\nB. {b}\n...\nAnswer:" (Global-MMLU)
    extract_number("The answer is 1,234.")   # -> "1234"

One item per JSONL line:

    multiple choice  {"id": "q1", "lang": "sw", "question": "...", "choices": ["..", ".."], "answer": 1, "passage"?: "..."}
    generation       {"id": "m1", "lang": "sw", "question": "...", "answer": 42}

Prompts are lm-evaluation-harness's: Global-MMLU `"{question}\nA. {a}\nB. {b}\n...\nAnswer:"`,
Belebele (items with a `passage`) `"P: {passage}\nQ: {question}\nA: {a}\n...\nAnswer:"`, MGSM
direct `"{question}\nAnswer:"`. Multiple-choice continuations are `" A"`, `" B"`, ... A file holds
one kind (set by `--task` or its first item); an item of the other kind is refused. Bad items
raise `EvalItemsError` (a ValueError) whose one-line message names the file, line and field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from sara_moe.data.corpus import iter_jsonl

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TASKS = ("mc", "gen")


class EvalItemsError(ValueError):
    """Bad eval items; the message names file, line and field."""


@dataclass
class EvalItem:
    id: str
    lang: str
    question: str
    answer: object  # int choice index (mc) or the reference answer (gen)
    choices: list = field(default_factory=list)
    passage: str | None = None
    line: int = 0


def _require_text(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise EvalItemsError(f"{where}: field {key!r} is missing")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise EvalItemsError(f"{where}: field {key!r} must be a non-empty string, got {value!r:.60}")
    return value


def parse_item(record, where: str, task: str, line: int = 0) -> EvalItem:
    """Validate one JSON record as an item of `task` ("mc" or "gen")."""
    if not isinstance(record, dict):
        raise EvalItemsError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    if "id" not in record:
        raise EvalItemsError(f"{where}: field 'id' is missing")
    lang = _require_text(record, "lang", where)
    question = _require_text(record, "question", where)
    if "answer" not in record or record["answer"] is None:
        raise EvalItemsError(f"{where}: field 'answer' is missing")
    answer = record["answer"]
    if task == "gen":
        if isinstance(answer, bool) or not isinstance(answer, (int, float, str)) or normalize_number(answer) is None:
            raise EvalItemsError(f"{where}: field 'answer' must be a number (or a numeric string), got {answer!r:.60}")
        return EvalItem(str(record["id"]), lang, question, answer, line=line)
    choices = record.get("choices")
    if choices is None:
        raise EvalItemsError(f"{where}: field 'choices' is missing (multiple-choice items need a list of options)")
    if not isinstance(choices, list) or len(choices) < 2:
        raise EvalItemsError(f"{where}: field 'choices' needs at least 2 options, got {choices!r:.80}")
    if len(choices) > len(LETTERS):
        raise EvalItemsError(f"{where}: field 'choices' has {len(choices)} options; at most {len(LETTERS)}")
    if not all(isinstance(c, str) for c in choices):
        raise EvalItemsError(f"{where}: field 'choices' must hold strings only")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise EvalItemsError(f"{where}: field 'answer' must be the index of the correct choice (an integer), "
                             f"got {answer!r:.60}")
    if not 0 <= answer < len(choices):
        raise EvalItemsError(f"{where}: field 'answer' is {answer}, out of range for {len(choices)} choices "
                             f"(0..{len(choices) - 1})")
    passage = record.get("passage")
    if passage is not None and (not isinstance(passage, str) or not passage.strip()):
        raise EvalItemsError(f"{where}: field 'passage' must be a non-empty string when given")
    return EvalItem(str(record["id"]), lang, question, answer, list(choices), passage, line)


def infer_task(record: dict) -> str:
    return "mc" if isinstance(record, dict) and "choices" in record else "gen"


def read_items(path, task: str | None = None, langs: list | None = None) -> tuple[str, list[EvalItem]]:
    """(task, items) of a JSONL file; `task` is inferred from the first item when None."""
    p = Path(path)
    if not p.is_file():
        raise EvalItemsError(f"{p}: no such file")
    if task is not None and task not in TASKS:
        raise EvalItemsError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    items: list[EvalItem] = []
    seen: dict[tuple, int] = {}
    source = "--task" if task else None
    for where, line_no, record in iter_jsonl(p, EvalItemsError):
        if task is None:
            task, source = infer_task(record), f"line {line_no}"
        if infer_task(record) != task:  # one kind per file: a stray item would be scored the wrong way
            kind = {"mc": "multiple-choice", "gen": "generation"}
            raise EvalItemsError(f"{where}: a {kind[infer_task(record)]} item in a {kind[task]} set (kind set by "
                                 f"{source}; multiple-choice items have 'choices'); keep one kind per file")
        item = parse_item(record, where, task, line_no)
        key = (item.lang, item.id)
        if key in seen:
            raise EvalItemsError(f"{where}: field 'id' {item.id!r} repeats line {seen[key]} for language "
                                 f"{item.lang!r}; ids must be unique per language (paired tests match them)")
        seen[key] = line_no
        items.append(item)
    if not items:
        raise EvalItemsError(f"{p}: no items (empty file)")
    if langs:
        present = {item.lang for item in items}
        missing = [lang for lang in langs if lang not in present]
        if missing:
            raise EvalItemsError(f"{p}: language(s) {','.join(missing)} have zero items "
                                 f"(the file has {','.join(sorted(present))})")
        items = [item for item in items if item.lang in langs]
    return task, items


def by_language(items: list[EvalItem]) -> dict[str, list[EvalItem]]:
    groups: dict[str, list[EvalItem]] = {}
    for item in items:
        groups.setdefault(item.lang, []).append(item)
    return dict(sorted(groups.items()))


# ----------------------------------------------------------------------------- prompts


def mc_prompt(item: EvalItem) -> str:
    """Global-MMLU prompt, or Belebele's when the item has a passage (as in lm-eval's task YAMLs)."""
    if item.passage:
        options = "".join(f"{LETTERS[i]}: {choice}\n" for i, choice in enumerate(item.choices))
        return f"P: {item.passage}\nQ: {item.question.strip()}\n{options}Answer:"
    options = "".join(f"{LETTERS[i]}. {choice}\n" for i, choice in enumerate(item.choices))
    return f"{item.question.strip()}\n{options}Answer:"


def mc_continuations(item: EvalItem) -> list[str]:
    return [f" {LETTERS[i]}" for i in range(len(item.choices))]


def gen_prompt(item: EvalItem) -> str:
    """MGSM direct prompt."""
    return f"{item.question}\nAnswer:"


# ----------------------------------------------------------------------------- answers

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*(?:\*\*)?\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(value) -> str | None:
    """Canonical string of a number: commas, `$` and a trailing period dropped, `42.0` -> `42`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = repr(value)
    elif isinstance(value, str):
        text = value.strip().replace(",", "").replace("$", "").rstrip(".")
    else:
        return None
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    if not number.is_finite():
        return None
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def extract_number(text: str) -> str | None:
    """The model's numeric answer: the number after "answer is" if present, else the last number."""
    match = _ANSWER_IS.search(text)
    if match:
        return normalize_number(match.group(1))
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def numbers_match(prediction: str | None, reference) -> bool:
    return prediction is not None and prediction == normalize_number(reference)
