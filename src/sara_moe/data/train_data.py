"""Training examples for `sara train`: one per (group, training language), labels on the response.

    from sara_moe.data.train_data import build_train_dataset
    dataset, stats = build_train_dataset("examples/parallel.jsonl", tokenizer, anchor="en",
                                         train_langs=["sw", "es"], max_length=512,
                                         prior_rows={"g1": 0, ...})   # or anchor_mode="online"

Rendering is `corpus.encode`, the one rendering priors and analysis use too: instruction values
through the tokenizer's chat template (or `corpus.PLAIN_TEMPLATE`, then followed by the EOS token
so the model learns to stop), plain strings as-is with the tokenizer's special tokens. Labels are
`-100` on the prompt tokens and the token ids on the response (plain strings: every token).
Truncation keeps the first `max_length` tokens; an example left with no response token is dropped
and counted in `stats["dropped_truncated"]`.

Columns: `input_ids`, `labels`, and for the trainer `sara_prior_row` (row of the group's
anchor in the prior cache; -1 = no alignment term for this example: an anchor-language
example, or a group without an anchor when `allow_missing_anchor`), `sara_has_anchor`,
`sara_name` (`"<group id>:<lang>"`, used in error messages), `sara_anchor_sha` (hash of the
group's anchor text, checked against the prior cache by `SaraTrainer`) and, for online anchors,
`sara_anchor_ids` / `sara_anchor_prompt_len` (the anchor text as the priors see it).
"""

from __future__ import annotations

import torch

from sara_moe.data.corpus import CorpusError, encode, read_corpus
from sara_moe.runtime.artifacts import text_sha
from sara_moe.runtime.loading import pad_batch

# where an example's anchor routing comes from: the prior cache of `sara priors`, or the model
# being trained run on the anchor text (the dataset then carries the anchor's tokens)
ANCHOR_MODES = ("cached", "online")


def parse_langs(value) -> list[str] | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return [str(x) for x in value]


def build_train_dataset(data, tokenizer, anchor: str = "en", train_langs=None, train_anchor: bool = False,
                        max_length: int | None = 1024, prior_rows: dict | None = None, anchor_mode: str = "cached",
                        allow_missing_anchor: bool = False):
    """`datasets.Dataset` of training examples and a dict of counts; see the module docstring."""
    from datasets import Dataset

    if anchor_mode not in ANCHOR_MODES:
        raise ValueError(f"field anchor_mode: {anchor_mode!r} is not one of {ANCHOR_MODES}")
    online = anchor_mode == "online"

    groups = list(read_corpus(data, anchor=None if allow_missing_anchor else anchor))
    if not groups:
        raise CorpusError(f"{data}: no groups")
    present = sorted({lang for g in groups for lang in g.texts})
    langs = parse_langs(train_langs) or [lang for lang in present if lang != anchor]
    missing = [lang for lang in langs if lang not in present]
    if missing:
        raise CorpusError(f"{data}: training language(s) {missing} appear in no group; "
                          f"the corpus has {present} (field train_langs)")
    if train_anchor and anchor not in langs:
        langs = langs + [anchor]
    if anchor not in present:
        raise CorpusError(f"{data}: no group has the anchor language {anchor!r}; the corpus has {present}")
    rows, stats = [], {"groups": len(groups), "examples": 0, "dropped_truncated": 0, "without_anchor": 0,
                       "langs": langs}
    for group in groups:
        has_anchor = anchor in group.texts
        if has_anchor and prior_rows is not None and group.id not in prior_rows:
            raise ValueError(f"{group.source}:{group.line}: group {group.id!r} is not in the prior cache; "
                             "rerun `sara priors` on this corpus")
        anchor_sha = text_sha(group.texts[anchor]) if has_anchor else ""
        anchor_ids, anchor_prompt = (encode(group.texts[anchor], tokenizer, max_length)
                                     if online and has_anchor else ([], 0))
        for lang in langs:
            if lang not in group.texts:
                continue
            ids, prompt_len = encode(group.texts[lang], tokenizer, max_length)
            if prompt_len >= len(ids):
                stats["dropped_truncated"] += 1
                continue
            aligned = has_anchor and lang != anchor
            stats["without_anchor"] += int(not aligned)
            rows.append({
                "input_ids": ids,
                "labels": [-100] * prompt_len + ids[prompt_len:],
                "sara_prior_row": int(prior_rows[group.id]) if aligned and prior_rows is not None else -1,
                "sara_has_anchor": int(aligned),
                "sara_name": f"{group.id}:{lang}",
                "sara_anchor_sha": anchor_sha,
                **({"sara_anchor_ids": anchor_ids if aligned else [], "sara_anchor_prompt_len": anchor_prompt}
                   if online else {}),
            })
    if not rows:
        raise CorpusError(f"{data}: no training examples for languages {langs} (all truncated away at "
                          f"max_length={max_length}?)")
    stats["examples"] = len(rows)
    return Dataset.from_list(rows), stats


class SaraCollator:
    """Wraps TRL's collator, which pads `input_ids`/`labels` (right, the tokenizer's pad id) and drops other
    columns: adds the `sara_*` fields back, the online anchor's tokens padded by `loading.pad_batch`."""

    def __init__(self, base, tokenizer):
        self.base = base
        self.tokenizer = tokenizer

    def __call__(self, examples):
        extras = [{k: ex[k] for k in ex if k.startswith("sara_")} for ex in examples]
        batch = self.base([{k: v for k, v in ex.items() if not k.startswith("sara_")} for ex in examples])
        if not extras or "sara_has_anchor" not in extras[0]:
            return batch
        batch["sara_prior_row"] = torch.tensor([e["sara_prior_row"] for e in extras], dtype=torch.long)
        batch["sara_has_anchor"] = torch.tensor([e["sara_has_anchor"] for e in extras], dtype=torch.bool)
        batch["sara_name"] = [e["sara_name"] for e in extras]
        if "sara_anchor_ids" in extras[0]:
            ids, mask = pad_batch(self.tokenizer, [e["sara_anchor_ids"] for e in extras], side="right")
            batch["sara_anchor_input_ids"] = ids
            batch["sara_anchor_attention_mask"] = mask
            batch["sara_anchor_prompt_len"] = torch.tensor([e["sara_anchor_prompt_len"] for e in extras])
        return batch
