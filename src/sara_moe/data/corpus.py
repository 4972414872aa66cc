"""The canonical parallel corpus: reading, validation, rendering to model text and token ids.

    from sara_moe.data.corpus import read_corpus, encode
    groups = list(read_corpus("examples/parallel.jsonl", anchor="en"))
    groups[0].id, groups[0].texts["sw"]
    input_ids, prompt_len = encode(groups[0].texts["sw"], tokenizer, max_length=1024)

Every text becomes token ids here, through one tokenizer call (`token_ids`): `encode` renders a
corpus value as training, priors, analysis and steer all see it; `encode_pair` / `encode_prompt`
tokenize eval prompts as lm-eval's HFLM does (log-likelihood scoring needs the continuation's
own tokens).

One parallel group per JSONL line; language keys are free codes; every key but `id` is a
language:

    {"id": "s1", "en": "The cat sleeps.", "sw": "Paka analala."}
    {"id": "g1", "en": {"prompt": "...", "response": "..."}, "sw": {"prompt": "...", "response": "..."}}
    {"id": "c1", "en": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}], ...}

A value is a string, a prompt/response pair, or a chat `messages` list (also accepted as
`{"messages": [...]}`). Any other source (parquet, JSON, CSV, a directory, or a hub id when
online) is read with `datasets.load_dataset` and validated the same way. Errors are one line
naming the file, line and field: bad JSON, bytes that are not UTF-8, a repeated group id
(with both line numbers), a missing anchor, an empty text; a missing path is reported at once
(no hub lookup) when the string looks like a path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


class CorpusError(ValueError):
    """Bad corpus input; the message names file, line and field."""


@dataclass
class Group:
    id: str
    texts: dict  # lang -> str | {"prompt","response"} | list of messages
    line: int = 0
    source: str = ""
    langs: list = field(default_factory=list)


def _check_value(value, where: str, lang: str):
    if isinstance(value, str):
        if not value.strip():
            raise CorpusError(f"{where}: field {lang!r} is an empty string; drop the language or give text")
        return value
    if isinstance(value, dict) and "messages" in value and len(value) == 1:
        value = value["messages"]
    if isinstance(value, dict):
        missing = [k for k in ("prompt", "response") if not isinstance(value.get(k), str) or not value[k].strip()]
        if missing:
            raise CorpusError(f"{where}: field {lang!r} needs non-empty string(s) {missing} "
                              "(value must be a string, {prompt, response} or a messages list)")
        return {"prompt": value["prompt"], "response": value["response"]}
    if isinstance(value, list):
        if not value or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                                for m in value):
            raise CorpusError(f"{where}: field {lang!r} must be a non-empty list of {{role, content}} messages")
        if value[-1]["role"] != "assistant":
            raise CorpusError(f"{where}: field {lang!r}: the last message must be the assistant's response")
        return value
    raise CorpusError(f"{where}: field {lang!r} has type {type(value).__name__}; "
                      "use a string, {prompt, response} or a messages list")


def parse_group(record, where: str, line: int = 0, source: str = "", anchor: str | None = None) -> Group:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    gid = record.get("id", line)
    texts = {}
    for lang, value in record.items():
        if lang == "id" or value is None:  # None: a column of a datasets table without this language
            continue
        texts[lang] = _check_value(value, where, lang)
    if not texts:
        raise CorpusError(f"{where}: no language fields (expected e.g. {{\"id\": ..., \"en\": ..., \"sw\": ...}})")
    if anchor is not None and anchor not in texts:
        raise CorpusError(f"{where}: field {anchor!r} (the anchor language) is missing; "
                          f"this group has {sorted(texts)}; add the anchor text or drop the group")
    return Group(str(gid), texts, line, source, sorted(texts))


def iter_jsonl(path, error: type = CorpusError) -> Iterator[tuple[str, int, object]]:
    """(\"file:line\", line number, parsed record) per non-blank line; bad JSON or UTF-8 raises `error`."""
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise error(f"{where}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                            "re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield where, line_no, json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None


def looks_like_path(text: str) -> bool:
    """True for strings a user means as a local path (hub ids are `name` or `org/name`)."""
    return (text.startswith((".", "/", "~")) or text.endswith(("/", "\\")) or "\\" in text
            or text.count("/") > 1)


def _unique_ids(groups: Iterator[Group]) -> Iterator[Group]:
    seen: dict[str, int] = {}
    for group in groups:
        if group.id in seen:
            raise CorpusError(f"{group.source}:{group.line}: group id {group.id!r} repeats line {seen[group.id]}; "
                              "ids must be unique (priors and paired tests match groups by id)")
        seen[group.id] = group.line
        yield group


def read_corpus(path, anchor: str | None = None, split: str = "train") -> Iterator[Group]:
    """Yield validated groups (ids unique) from a JSONL file or any `datasets` source, streaming."""
    return _unique_ids(_read_groups(path, anchor, split))


def _read_groups(path, anchor: str | None, split: str) -> Iterator[Group]:
    path_str = str(path)
    p = Path(path_str)
    if p.is_file() and p.suffix in (".jsonl", ".ndjson"):
        for where, line_no, record in iter_jsonl(p, CorpusError):
            yield parse_group(record, where, line_no, path_str, anchor)
        return
    if not p.exists() and (p.suffix or looks_like_path(path_str)):
        raise CorpusError(f"{p}: no such file or directory")
    from datasets import load_dataset

    builders = {".parquet": "parquet", ".json": "json", ".csv": "csv"}
    if p.is_file():
        dataset = load_dataset(builders.get(p.suffix, "json"), data_files=path_str, split=split)
    else:
        dataset = load_dataset(path_str, split=split)
    for row_no, record in enumerate(dataset, start=1):
        yield parse_group(dict(record), f"{path_str}:row {row_no}", row_no, path_str, anchor)


def to_messages(value) -> list[dict]:
    """Chat messages of an instruction value (prompt/response or messages list)."""
    if isinstance(value, list):
        return value
    return [{"role": "user", "content": value["prompt"]}, {"role": "assistant", "content": value["response"]}]


def render_plain(value) -> str:
    """Human-readable text of any value (used to train tokenizers, never fed to a model)."""
    if isinstance(value, str):
        return value
    return "\n".join(m["content"] for m in to_messages(value))


def render_text(value, tokenizer) -> tuple[str, str]:
    """(prompt_text, full_text) as the model sees them.

    Strings are used as-is (prompt_text is empty). Instruction values go through the
    tokenizer's chat template when it has one, else through PLAIN_TEMPLATE; the response
    starts where prompt_text ends, which is what training uses to put labels on the
    response only. A message list that ends with a user turn is a prompt only (steer's
    question-only task data): the chat template's generation prompt, or without a template
    the last message as-is; all of it is prompt.
    """
    if isinstance(value, str):
        return "", value
    messages = to_messages(value)
    templated = bool(getattr(tokenizer, "chat_template", None))
    if messages[-1]["role"] != "assistant":
        text = (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) if templated
                else messages[-1]["content"])
        return text, text
    if templated:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise CorpusError("chat template renders the prompt differently with and without the answer; "
                              "sara-moe cannot locate the response tokens")
        return prompt, full
    history = "\n\n".join(m["content"] for m in messages[:-1])
    prompt = PLAIN_TEMPLATE.format(prompt=history)
    return prompt, prompt + messages[-1]["content"]


# Every text -> token ids in sara-moe goes through this one tokenizer call; callers only decide whether
# the tokenizer adds its special tokens (not when the text already carries them).
def token_ids(text: str, tokenizer, special_tokens: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special_tokens)["input_ids"]


def encode(value, tokenizer, max_length: int | None = None, *, eos: bool = True) -> tuple[list[int], int]:
    """(input_ids, prompt_length) of a corpus value as training, priors, analysis and steer see it.

    Strings keep the tokenizer's special tokens; rendered chat-template text already carries
    its own, so it is encoded without more. A plain-template instruction value ends with the
    EOS token (the model learns to stop, as a chat template's end of turn teaches it) unless
    `eos=False` (steer's task data, never trained on, keeps the ids its specs were made from).
    Truncation keeps the first `max_length` tokens.
    """
    prompt, full = render_text(value, tokenizer)
    if isinstance(value, str):
        return token_ids(full, tokenizer)[:max_length], 0
    templated = bool(getattr(tokenizer, "chat_template", None))
    answered = isinstance(value, dict) or value[-1]["role"] == "assistant"
    ids = token_ids(full, tokenizer, not templated)
    prompt_len = len(token_ids(prompt, tokenizer, not templated)) if answered else len(ids)
    end = tokenizer.eos_token_id
    if eos and answered and not templated and end is not None and ids[-1:] != [end]:
        ids = ids + [end]
    ids = ids[:max_length]
    return ids, min(prompt_len, len(ids))


def encode_pair(context: str, continuation: str, tokenizer) -> tuple[list[int], list[int]]:
    """(context_ids, continuation_ids) of an eval prompt, tokenized as lm-eval's HFLM does for causal
    log-likelihood scoring: trailing context spaces move to the continuation, `enc(context +
    continuation)` is split at `len(enc(context))`, so the continuation's tokens are the ones the
    model predicts after the context (see `encode_prompt` for `enc`)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode_prompt(context + continuation, tokenizer)
    context_ids = encode_prompt(context, tokenizer)
    return context_ids, whole[len(context_ids):]


def encode_prompt(text: str, tokenizer) -> list[int]:
    """An eval prompt's ids as lm-eval's HFLM.tok_encode makes them: the tokenizer's special tokens
    unless the text already starts with BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    return token_ids(text, tokenizer, not (bos and text.startswith(bos)))
