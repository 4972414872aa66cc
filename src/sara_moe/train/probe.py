"""The routing monitor's probe set: parallel groups never trained on, from a file or split off the corpus.

    from sara_moe.train.probe import prepare_probe, read_probe
    probe = prepare_probe(cfg)        # SaraConfig with probe_data set; before the model loads
    probe.groups, probe.langs, probe.source, probe.held_out
    probe = read_probe("probe.jsonl", anchor="en")   # a Python user's own file, no corpus checks

`probe_data: split` holds `probe_groups` groups of the training corpus out of training, drawn by
`seed` (the same groups for the same corpus and seed) among the groups with the anchor text and a
training language; `build_train_dataset(..., exclude_ids=probe.held_out)` then leaves them out.
A probe file is read like a corpus (`data.corpus.read_corpus`) and refused, in one line naming the
file and line, when a group lacks the anchor text, carries a language the run does not train, or
has an id that is also in the training corpus (it would not be held out).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from sara_moe.data.corpus import CorpusError, Group, read_corpus
from sara_moe.data.train_data import parse_langs

SPLIT = "split"  # probe_data value: hold groups of the training corpus out


@dataclass
class Probe:
    """Probe groups (each with the anchor text), the non-anchor languages measured, where they came from."""

    groups: list[Group]
    anchor: str
    langs: list[str]
    source: str  # the probe file's path, or "split"
    held_out: set = field(default_factory=set)  # ids the training dataset must skip (split only)

    @property
    def ids(self) -> list[str]:
        return [g.id for g in self.groups]


def read_probe(path, anchor: str = "en", train_langs: list[str] | None = None) -> Probe:
    """A held-out probe file; every group needs the anchor text, and with `train_langs` no other language."""
    groups = list(read_corpus(path, anchor=anchor))  # a group without the anchor: one line naming file:line
    if not groups:
        raise CorpusError(f"{path}: no groups; give the probe at least one parallel group (field probe_data)")
    if train_langs is not None:
        allowed = set(train_langs) | {anchor}
        for group in groups:
            extra = sorted(set(group.texts) - allowed)
            if extra:
                raise CorpusError(f"{group.source}:{group.line}: field {extra[0]!r}: language not trained by this "
                                  f"run (train languages {sorted(train_langs)}); drop it from the probe or add it "
                                  "to train_langs")
    langs = sorted({lang for g in groups for lang in g.texts} - {anchor})
    if not langs:
        raise CorpusError(f"{path}: the probe has only the anchor language {anchor!r}; add parallel text in a "
                          "training language")
    return Probe(groups, anchor, langs, str(path))


def split_probe(groups: list[Group], data, anchor: str, langs: list[str], count: int, seed: int) -> Probe:
    """`count` groups with the anchor and a training language, drawn by `seed`, kept in corpus order."""
    eligible = [g for g in groups if anchor in g.texts and any(lang in g.texts for lang in langs)]
    if count >= len(eligible):
        raise ValueError(f"field probe_groups: {count} probe groups would leave no training group ({data} has "
                         f"{len(eligible)} groups with {anchor!r} and a training language); lower probe_groups "
                         f"below {len(eligible)} or give probe_data a held-out file")
    picked = sorted(random.Random(seed).sample(range(len(eligible)), count))
    chosen = [eligible[i] for i in picked]
    present = sorted({lang for g in chosen for lang in g.texts} & set(langs))
    return Probe(chosen, anchor, present, SPLIT, {g.id for g in chosen})


def prepare_probe(cfg) -> Probe:
    """The probe of a `SaraConfig` run (`probe_data` a file or "split"), checked against its training corpus."""
    if not cfg.data:
        raise ValueError("field data: required (YAML key or --data)")
    corpus = list(read_corpus(cfg.data, anchor=None if cfg.allow_missing_anchor else cfg.anchor))
    present = sorted({lang for g in corpus for lang in g.texts})
    # the languages build_train_dataset trains (its own errors come later, with the tokenizer)
    langs = [lang for lang in (parse_langs(cfg.train_langs) or present) if lang != cfg.anchor]
    if cfg.probe_data == SPLIT:
        return split_probe(corpus, cfg.data, cfg.anchor, langs, cfg.probe_groups, cfg.seed)
    probe = read_probe(cfg.probe_data, cfg.anchor, langs)
    train_ids = {g.id for g in corpus}
    for group in probe.groups:
        if group.id in train_ids:
            raise CorpusError(f"{group.source}:{group.line}: group id {group.id!r} is also in the training corpus "
                              f"{cfg.data}; a probe must be held out: drop or rename it (or use probe_data split)")
    return probe
