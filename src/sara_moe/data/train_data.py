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
                        allow_missing_anchor: bool = False, exclude_ids=None):
    """`datasets.Dataset` of training examples and a dict of counts; see the module docstring.
    Groups whose id is in `exclude_ids` (a probe held out of training) are left out and counted."""
    from datasets import Dataset

    if anchor_mode not in ANCHOR_MODES:
        raise ValueError(f"field anchor_mode: {anchor_mode!r} is not one of {ANCHOR_MODES}")
    online = anchor_mode == "online"

    groups = list(read_corpus(data, anchor=None if allow_missing_anchor else anchor))
    held_out = len(groups)
    groups = [g for g in groups if g.id not in (exclude_ids or ())]
    held_out -= len(groups)
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
                       "langs": langs, **({"held_out": held_out} if exclude_ids is not None else {})}
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


PACKING_STRATEGIES = ("bfd", "bfd_split")  # TRL's strategies that keep every example whole in one row


def check_truncated(dataset, max_length: int) -> None:
    """Padding-free without packing leaves truncation to the dataset: refuse a longer example in one line."""
    if dataset is None or not hasattr(dataset, "column_names") or "input_ids" not in dataset.column_names:
        if dataset is not None:
            raise ValueError("field padding_free: without packing the examples must come tokenized and truncated "
                             "(input_ids); build them with build_train_dataset or set packing true")
        return
    names = dataset["sara_name"] if "sara_name" in dataset.column_names else None
    for index, ids in enumerate(dataset["input_ids"]):
        if len(ids) > max_length:
            name = names[index] if names else f"row {index}"
            raise ValueError(f"field padding_free: example {name} has {len(ids)} tokens > max_length {max_length} "
                             "and padding-free batches are not truncated; rebuild the dataset with this max_length")


def check_packing(dataset, max_length: int, strategy: str) -> None:
    """Refuse the packing `pack_sara_dataset` cannot keep per example (see there), in one line."""
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"field packing_strategy: {strategy!r} cuts examples mid-sequence and lets them attend "
                         f"across boundaries; SARA pools each example over its own tokens, use one of "
                         f"{PACKING_STRATEGIES}")
    if strategy == "bfd_split":
        for name, ids in zip(dataset["sara_name"], dataset["input_ids"]):
            if len(ids) > max_length:
                raise ValueError(f"field packing_strategy: bfd_split would split example {name} ({len(ids)} tokens "
                                 f"> max_length {max_length}) across rows; SARA pools an example over its own "
                                 "tokens in one forward: raise max_length or use bfd (truncates)")


def pack_sara_dataset(dataset, max_length: int, strategy: str, catalog: list, map_kwargs: dict | None = None,
                      shuffle_seed: int | None = None):
    """TRL's `pack_dataset` over `input_ids`/`labels` plus a per-token `sara_example` column (an index into
    `catalog`, to which this dataset's `sara_*` values are appended), so each packed segment can be traced
    back to its example: packing concatenates list columns and would drop per-example scalars.

    `wrapped` is refused (it cuts examples mid-sequence and lets them attend across boundaries, so no
    example's routing is its own); `bfd_split` is refused when it would split an example (longer than
    `max_length`): the pieces land in different rows, attend only within themselves and may fall in
    different batches, so they cannot be pooled as one example. `bfd` truncates such examples.
    """
    from trl import pack_dataset

    check_packing(dataset, max_length, strategy)
    offset = len(catalog)
    catalog.extend(dataset.select_columns([c for c in dataset.column_names if c.startswith("sara_")]).to_list())
    dataset = dataset.map(lambda ex, i: {"sara_example": [offset + i] * len(ex["input_ids"])}, with_indices=True,
                          **(map_kwargs or {}))
    dataset = dataset.select_columns(["input_ids", "labels", "sara_example"])
    if shuffle_seed is not None:  # as TRL: shuffle before packing, so neighbours in a row are random
        dataset = dataset.shuffle(seed=shuffle_seed)
    return pack_dataset(dataset, max_length, strategy, map_kwargs or {})


class SaraCollator:
    """Wraps TRL's collator, which pads or flattens (padding-free) `input_ids`/`labels` and drops other
    columns, and adds per batch:

    - `sara_segment [B, S]`: each token's example index in the batch (-1: pad), for padded rows (one
      example per row), padding-free batches (examples one after another in one row) and packed rows
      (segments from each row's `seq_lengths`, example from its per-token `sara_example`, whose
      values live in `catalog`);
    - `sara_response [B, S]`: the token has a label (TRL's padding-free collator masks each example's
      first label; this mask is taken before that, so pooling matches the unpacked example);
    - per example (segment): `sara_prior_row`, `sara_has_anchor`, `sara_name` and for online anchors
      `sara_anchor_input_ids` / `sara_anchor_attention_mask` (padded by `loading.pad_batch`) and
      `sara_anchor_prompt_len`.
    """

    def __init__(self, base, tokenizer, catalog: list | None = None):
        self.base = base
        self.tokenizer = tokenizer
        self.catalog = catalog if catalog is not None else []

    def _segments(self, examples) -> tuple[list[dict], list[list[tuple[int, int]]]]:
        """Per-example `sara_*` values and, per input row, its segments as (example, length)."""
        metas, rows = [], []
        for ex in examples:
            if "sara_example" not in ex:
                metas.append({k: ex[k] for k in ex if k.startswith("sara_")})
                rows.append([(len(metas) - 1, len(ex["input_ids"]))])
                continue
            owners, start, row = ex["sara_example"], 0, []
            for length in ex.get("seq_lengths") or [len(owners)]:
                piece = owners[start: start + length]
                if len(set(piece)) != 1:
                    raise ValueError(f"a packed row mixes examples inside one segment ({sorted(set(piece))}); "
                                     "pack with packing_strategy bfd so every example is its own segment")
                metas.append(self.catalog[piece[0]])
                row.append((len(metas) - 1, length))
                start += length
            rows.append(row)
        return metas, rows

    def __call__(self, examples):
        if not examples or not any(k.startswith("sara_") for k in examples[0]):
            return self.base(examples)
        metas, rows = self._segments(examples)
        batch = self.base([{k: v for k, v in ex.items() if not k.startswith("sara_")} for ex in examples])
        flat = "attention_mask" not in batch  # padding-free: every example in one row
        width = batch["input_ids"].shape[-1]
        segment_rows, response_rows = [], []
        for ex, row in zip(examples, rows):
            owners = [index for index, length in row for _ in range(length)]
            answered = [label != -100 for label in ex.get("labels", ex["input_ids"])]
            if flat and segment_rows:
                segment_rows[0] += owners
                response_rows[0] += answered
            else:
                segment_rows.append(owners)
                response_rows.append(answered)
        batch["sara_segment"] = torch.tensor([r + [-1] * (width - len(r)) for r in segment_rows], dtype=torch.long)
        batch["sara_response"] = torch.tensor([r + [False] * (width - len(r)) for r in response_rows])
        batch["sara_prior_row"] = torch.tensor([m["sara_prior_row"] for m in metas], dtype=torch.long)
        batch["sara_has_anchor"] = torch.tensor([m["sara_has_anchor"] for m in metas], dtype=torch.bool)
        batch["sara_name"] = [m["sara_name"] for m in metas]
        if "sara_anchor_ids" in metas[0]:
            ids, mask = pad_batch(self.tokenizer, [m["sara_anchor_ids"] for m in metas], side="right")
            batch["sara_anchor_input_ids"] = ids
            batch["sara_anchor_attention_mask"] = mask
            batch["sara_anchor_prompt_len"] = torch.tensor([m["sara_anchor_prompt_len"] for m in metas])
        return batch
