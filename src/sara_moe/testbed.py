"""The cloned-language testbed: a synthetic world, its corpora and a tiny MoE pretrained on it.

    sara testbed build --output_dir runs/testbed [--config configs/testbed.yaml] [--seed 0]
    sara testbed pretrain --testbed runs/testbed --output_dir runs/base [--arch qwen3_moe] [--max_steps 600]

    from sara_moe.testbed import TestbedConfig, build, pretrain
    info = build(TestbedConfig(seed=0), "runs/testbed")
    pretrain("runs/testbed", "runs/base")

`build` writes (world in `testbed_world`): `tokenizer/` (word-level HF tokenizer),
`pretrain.jsonl` (`{"lang", "text"}` documents: bios of persons and additions; English
knows every fact, clones only the "shared" half, each clone gets `share` of the documents),
`pretrain_topics.jsonl` (per document one letter per word: the topic, i.e. the attribute of
the fact sentence the word belongs to, `-` outside facts; the text itself is unchanged, same
seed -> same bytes), `instruct.jsonl` (canonical parallel corpus: question -> answer restating
the fact, for the fine-tuning facts of both halves), `probe.jsonl` (parallel plain sentences
plus `en_other`, a *different* English sentence: the English-vs-English routing baseline for
`sara analyze`), `eval_mc_shared.jsonl` / `eval_mc_en_only.jsonl` (held-out facts as `sara
eval` multiple choice items, all values of the attribute as choices; `split` says which half,
`part` whether the fact is `dev` (for choosing settings) or `test` (for reporting), disjoint
by fact), `eval_gen.jsonl` (held-out additions, numeric answers), `testbed.json` (world,
facts, knobs, counts, dev/test facts), `testbed_config.json` (the world's knobs, a
`TestbedConfig`, also a valid `--config`) and
`metadata.json` (versions, command line). Published through `artifacts` (an existing
testbed is refused unless `overwrite`). Both sub-verbs take every `TestbedConfig` knob as a
flag or `--config` YAML key (`BuildConfig`, `PretrainConfig`); pretrain's defaults are the
testbed's `testbed_config.json`.

`pretrain` trains a random-init tiny MoE (`tiny.tiny_config`, scaled by `hidden_size`) with
transformers' Trainer on packed `seq_len`-token blocks, load-balancing loss on, and saves an
ordinary HF model dir + tokenizer + `pretrain_log.json` + `pretrain_config.json` (the
resolved `PretrainConfig`). The **routing knob** (`route_weight` > 0) adds `route_weight x
route_loss`: on the MoE layers `route_layers`, the mean over supervised tokens of -log(router
mass on the token's expert group), where the experts are split evenly into one group per
language (`route_by: lang`) or per (language, topic) (`lang_topic`, fact-sentence words only).
Router distributions are read through `routing.RouterRecorder`, so any family the project
reads works; weight 0 takes the plain Trainer path, bit-identical to a world without the knob.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from transformers import Trainer

from . import artifacts
from .corpus import PLAIN_TEMPLATE
from .routing import RouterRecorder
from .testbed_world import ATTRS, Clone, World

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
TOPICS = list(ATTRS)  # topic labels of fact sentences, in group order
TOPIC_CODE = {None: "-", **{t: ATTRS[t][0] for t in TOPICS}}  # one letter per word in pretrain_topics.jsonl
ROUTE_BY = ("lang", "lang_topic")
# tokens of the prompt formats the pipeline renders (PLAIN_TEMPLATE, sara eval's MC and gen prompts)
FORMAT_TOKENS = ["###", "Instruction:", "Response:", "Answer:", "Question:"] + \
    [f"{c}." for c in "ABCDEFGHIJKLMNOP"] + list("ABCDEFGHIJKLMNOP")


@dataclass
class TestbedConfig:
    """Knobs of `sara testbed build` and `pretrain` (YAML keys are these names; see configs/testbed.yaml)."""

    __test__ = False  # not a pytest class

    seed: int = field(default=0, metadata={"help": "world seed (same seed, same bytes)"})
    num_persons: int = field(default=96, metadata={"help": "persons whose facts the world holds"})
    en_only_fraction: float = field(default=0.5, metadata={
        "help": "of (person, attribute) facts, those in English pretraining text only"})
    heldout_fraction: float = field(default=0.5, metadata={
        "help": "of each half, kept out of fine-tuning and used for evaluation"})
    addition_fraction: float = field(default=0.2, metadata={"help": "of pretraining documents: additions"})
    max_number: int = field(default=20, metadata={"help": "largest addend of the additions"})
    num_documents: int = field(default=12000, metadata={"help": "pretraining documents"})
    clones: list[dict] = field(default_factory=lambda: [
        {"name": "c1", "share": 0.1, "entities": "separate"},
        {"name": "c2", "share": 0.1, "entities": "shared"},
        {"name": "c3", "share": 0.1, "entities": "shared", "swap": True}], metadata={
        "help": "cloned languages: {name, share, entities: separate|shared, swap} each (YAML only)"})
    # pretraining (sara testbed pretrain)
    arch: str = field(default="qwen3_moe", metadata={"help": "tiny MoE family (tiny.TINY_ARCHS)"})
    hidden_size: int = field(default=128, metadata={"help": "model width (the tiny config scaled by it)"})
    num_hidden_layers: int = field(default=4, metadata={"help": "decoder layers"})
    num_experts: int = field(default=8, metadata={"help": "routed experts per MoE layer"})
    seq_len: int = field(default=64, metadata={"help": "tokens per packed pretraining block"})
    batch_size: int = field(default=16, metadata={"help": "blocks per pretraining step"})
    max_steps: int = field(default=1200, metadata={"help": "pretraining steps"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak learning rate (cosine schedule)"})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "load-balancing loss weight"})
    # the routing knob: during pretraining add route_weight x mean over route_layers of
    # -log(router mass on the token's expert group); 0 = off. route_by "lang": one group of
    # experts per language; "lang_topic": one per (language, topic of the fact sentence), topic
    # tokens only (additions and special tokens are left free). Groups split the experts evenly.
    route_weight: float = field(default=0.0, metadata={"help": "weight of the routing knob (0 = off)"})
    route_by: str = field(default="lang", metadata={"help": "expert groups of the knob", "choices": list(ROUTE_BY)})
    route_layers: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "MoE layers the knob acts on"})
    dev_fraction: float = field(default=0.5, metadata={
        "help": "of held-out facts, those used for selection (dev); the rest is test"})

    def clone_objs(self) -> list[Clone]:
        return [Clone(**c) for c in self.clones]


def _dump(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build_tokenizer(vocabulary: list[str]):
    """A word-level HF fast tokenizer over whitespace-split words; `<s>` prepended like tiny.build_tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [w for w in dict.fromkeys(FORMAT_TOKENS + list(vocabulary)) if w not in SPECIALS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", words.index("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _split_facts(cfg: TestbedConfig, world: World) -> dict:
    rng = random.Random(f"{cfg.seed}:split")
    keys = sorted(world.facts)
    rng.shuffle(keys)
    n_en = int(round(cfg.en_only_fraction * len(keys)))
    halves = {"en_only": keys[:n_en], "shared": keys[n_en:]}
    split = {}
    for name, ks in halves.items():
        n_held = int(round(cfg.heldout_fraction * len(ks)))
        split[name] = {"heldout": sorted(ks[:n_held]), "finetune": sorted(ks[n_held:])}
    return split


def _dev_test(cfg: TestbedConfig, split: dict) -> dict:
    """Held-out facts -> "dev" or "test", per half; disjoint by fact (an own random stream, so the
    split changes no other draw of the world)."""
    rng = random.Random(f"{cfg.seed}:devtest")
    part = {}
    for half in ("shared", "en_only"):
        keys = list(split[half]["heldout"])
        rng.shuffle(keys)
        n_dev = int(round(cfg.dev_fraction * len(keys)))
        part.update({k: "dev" if i < n_dev else "test" for i, k in enumerate(keys)})
    return part


def instruct_topic(group_id: str) -> str:
    """The attribute (topic) an instruct group asks about: ids are `ft-<half>-p<person>-<attr>`."""
    return group_id.rsplit("-", 1)[-1]


def build(cfg: TestbedConfig, output_dir, overwrite: bool = False) -> dict:
    """Generate the world and every file the pipeline consumes; returns testbed.json's dict.

    An existing testbed in `output_dir` is refused unless `overwrite`."""
    artifacts.claim(output_dir, "testbed.json", overwrite)
    clones = cfg.clone_objs()
    world = World(cfg.seed, cfg.num_persons, clones, cfg.max_number)
    langs = ["en"] + [c.name for c in clones]
    split = _split_facts(cfg, world)
    shared = {k for part in split["shared"].values() for k in part}
    text = lambda words: " ".join(words)  # noqa: E731
    rng = random.Random(f"{cfg.seed}:docs")
    shares = [1 - sum(c.share for c in clones)] + [c.share for c in clones]
    if shares[0] <= 0:
        raise ValueError("clone shares must sum to less than 1 (English gets the rest)")
    heldout_adds = {(a, b) for a in range(cfg.max_number + 1) for b in range(cfg.max_number + 1)
                    if (a * 7 + b * 3 + cfg.seed) % 10 == 0}
    docs, topics = [], []
    for _ in range(cfg.num_documents):
        lang = rng.choices(langs, weights=shares)[0]
        if rng.random() < cfg.addition_fraction:
            while True:
                a, b = rng.randrange(cfg.max_number + 1), rng.randrange(cfg.max_number + 1)
                if (a, b) not in heldout_adds:
                    break
            words = world.translate(world.addition(a, b), lang)
            labels = [None] * len(words)
        else:
            p = rng.randrange(cfg.num_persons)
            attrs = [a for a in ATTRS if lang == "en" or (p, a) in shared]
            if not attrs:
                continue
            words, labels = world.translate_labeled(world.bio_sentences(p, attrs, rng), lang)
        docs.append({"lang": lang, "text": text(words)})
        topics.append({"topics": "".join(TOPIC_CODE[t] for t in labels)})

    def qa(p, a, lang, value=None):
        return {"prompt": text(world.translate(world.question(p, a), lang)),
                "response": text(world.translate(world.answer(p, a, value), lang))}

    instruct = [{"id": f"ft-{half}-p{p}-{a}", **{lang: qa(p, a, lang) for lang in langs}}
                for half in ("shared", "en_only") for (p, a) in split[half]["finetune"]]
    rng.shuffle(instruct)
    probe_rng = random.Random(f"{cfg.seed}:probe")
    facts = sorted(world.facts)
    probe = []
    for i in range(64):
        p, a = facts[probe_rng.randrange(len(facts))]
        words = world.fact_sentence(p, a, probe_rng.randrange(2))
        while True:
            q, b = facts[probe_rng.randrange(len(facts))]
            if q != p and b != a:
                break
        probe.append({"id": f"probe{i}", **{lang: text(world.translate(words, lang)) for lang in langs},
                      "en_other": text(world.fact_sentence(q, b, probe_rng.randrange(2)))})
    fact_part = _dev_test(cfg, split)
    evals = {}
    for half in ("shared", "en_only"):
        rows = []
        for lang in langs:
            for (p, a) in split[half]["heldout"]:
                prompt = qa(p, a, lang)["prompt"]
                choices = [qa(p, a, lang, v)["response"] for v in range(ATTRS[a][1])]
                rows.append({"id": f"{half}:p{p}:{a}", "lang": lang, "split": half, "part": fact_part[(p, a)],
                             "question": PLAIN_TEMPLATE.format(prompt=prompt).rstrip("\n"), "prompt": prompt,
                             "choices": choices, "answer": world.facts[(p, a)]})
        evals[f"eval_mc_{half}.jsonl"] = rows
    gen = [{"id": f"add:{a}+{b}", "lang": lang, "question": text(world.translate(
        f"what is n{a} plus n{b} ?".split(), lang)), "answer": a + b}
        for lang in langs for (a, b) in sorted(heldout_adds)]
    tokenizer = build_tokenizer(world.vocabulary())
    info = {
        "seed": cfg.seed, "langs": langs, "clones": [asdict(c) for c in clones],
        "pretrain_share": dict(zip(langs, shares)),
        "attributes": {a: n for a, (_, n) in ATTRS.items()}, "num_persons": cfg.num_persons,
        "facts": {f"p{p}:{a}": f"{ATTRS[a][0]}{v}" for (p, a), v in sorted(world.facts.items())},
        "fact_split": {h: {part: [f"p{p}:{a}" for p, a in ks] for part, ks in d.items()} for h, d in split.items()},
        "clone_vocab": world.maps,
        "counts": {"pretrain_docs": {lang: sum(d["lang"] == lang for d in docs) for lang in langs},
                   "instruct_groups": len(instruct), "eval_mc": {k: len(v) for k, v in evals.items()},
                   "eval_gen": len(gen), "vocab_size": len(tokenizer)},
        "fact_part": {name: sorted(f"p{p}:{a}" for (p, a), v in fact_part.items() if v == name) for name in ("dev", "test")},
        "files": ["pretrain.jsonl", "pretrain_topics.jsonl", "instruct.jsonl", "probe.jsonl", *evals, "eval_gen.jsonl", "tokenizer/",
                  "metadata.json"],
        "note": "English pretraining text holds every fact; clones only the 'shared' half. eval_mc_en_only "
                "measures transfer of facts seen only in English.",
    }
    with artifacts.publishing(output_dir, overwrite, primary="testbed.json") as tmp:
        (tmp / "pretrain.jsonl").write_text(_dump(docs), encoding="utf-8")
        (tmp / "pretrain_topics.jsonl").write_text(_dump(topics), encoding="utf-8")
        (tmp / "instruct.jsonl").write_text(_dump(instruct), encoding="utf-8")
        (tmp / "probe.jsonl").write_text(_dump(probe), encoding="utf-8")
        for name, rows in evals.items():
            (tmp / name).write_text(_dump(rows), encoding="utf-8")
        (tmp / "eval_gen.jsonl").write_text(_dump(gen), encoding="utf-8")
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "testbed.json").write_text(json.dumps(info, indent=2))  # deterministic: same seed, same bytes
        (tmp / "metadata.json").write_text(json.dumps(artifacts.run_metadata(seed=cfg.seed), indent=2))
        (tmp / "testbed_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return info


# ----------------------------------------------------------------------------- pretraining


def packed_blocks(testbed, tokenizer, seq_len: int, route_by: str | None = None, langs: list | None = None):
    """All pretraining documents, each `<s> words </s>`, concatenated and cut into `seq_len` blocks.

    With `route_by`, returns `(blocks, groups)`: per token its expert group for the routing
    knob (`route_group_of`), -1 where unsupervised (special tokens; in `lang_topic` also words
    outside a fact sentence)."""
    testbed = Path(testbed)
    stream: list[int] = []
    groups: list[int] = []
    topic_file = open(testbed / "pretrain_topics.jsonl", encoding="utf-8") if route_by else None
    with open(testbed / "pretrain.jsonl", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            doc = json.loads(line)
            ids = tokenizer(doc["text"])["input_ids"] + [tokenizer.eos_token_id]
            stream += ids
            if topic_file is not None:
                codes = json.loads(topic_file.readline())["topics"]
                if len(codes) != len(ids) - 2:  # <s> ... </s>
                    raise ValueError(f"{testbed / 'pretrain_topics.jsonl'}:{number}: {len(codes)} topic labels for "
                                     f"{len(ids) - 2} words; rebuild the testbed (`sara testbed build`)")
                groups += [-1] + [route_group_of(route_by, langs, doc["lang"], c) for c in codes] + [-1]
    if topic_file is not None:
        topic_file.close()
    cut = lambda xs: [xs[i:i + seq_len] for i in range(0, len(xs) - seq_len + 1, seq_len)]  # noqa: E731
    return (cut(stream), cut(groups)) if route_by else cut(stream)


def route_group_of(route_by: str, langs: list, lang: str, code: str) -> int:
    """Expert group of one word: its language (`lang`), or its (language, topic) (`lang_topic`)."""
    if route_by == "lang":
        return langs.index(lang)
    if route_by == "lang_topic":
        topic = next((t for t in TOPICS if TOPIC_CODE[t] == code), None)
        return -1 if topic is None else langs.index(lang) * len(TOPICS) + TOPICS.index(topic)
    raise ValueError(f"field route_by: {route_by!r}; choose one of {ROUTE_BY}")


def expert_groups(cfg: TestbedConfig, num_langs: int) -> torch.Tensor:
    """`[groups, experts]` 0/1 membership: group g owns experts g*k .. (g+1)*k - 1, k = experts // groups."""
    count = num_langs * (len(TOPICS) if cfg.route_by == "lang_topic" else 1)
    if cfg.route_by not in ROUTE_BY:
        raise ValueError(f"field route_by: {cfg.route_by!r}; choose one of {ROUTE_BY}")
    if cfg.num_experts % count:
        raise ValueError(f"field num_experts: {cfg.num_experts} experts cannot be split evenly into {count} groups "
                         f"(route_by {cfg.route_by!r}, {num_langs} languages); use a multiple of {count}")
    k = cfg.num_experts // count
    membership = torch.zeros(count, cfg.num_experts)
    for g in range(count):
        membership[g, g * k:(g + 1) * k] = 1.0
    return membership


def route_loss(probs: dict, groups: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the mean over supervised tokens of -log(router mass on the token's group).

    `probs`: {layer: [B, S, E]} router distributions; `groups`: `[B, S]`, -1 = unsupervised."""
    supervised = (groups >= 0).float()
    index = groups.clamp_min(0).unsqueeze(-1)
    terms = []
    for layer_probs in probs.values():
        mass = (layer_probs @ membership.to(layer_probs).T).gather(-1, index).squeeze(-1)
        terms.append(-(mass.clamp_min(1e-8).log() * supervised).sum() / supervised.sum().clamp_min(1.0))
    return torch.stack(terms).mean()


def model_config(cfg: TestbedConfig, vocab_size: int):
    from .tiny import TINY_ARCHS, tiny_config

    scale = cfg.hidden_size / 32
    fields_ = TINY_ARCHS[cfg.arch][2] if cfg.arch in TINY_ARCHS else {}
    overrides = {k: int(v * scale) for k, v in fields_.items()
                 if k in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")}
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if key in fields_:
            overrides[key] = cfg.num_experts
    if "head_dim" in fields_:
        overrides["head_dim"] = cfg.hidden_size // 4
    return tiny_config(cfg.arch, vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                       tie_word_embeddings=True, output_router_logits=True,
                       router_aux_loss_coef=cfg.router_aux_loss_coef, max_position_embeddings=max(256, cfg.seq_len),
                       **overrides)


def pretrain(testbed, output_dir, cfg: TestbedConfig | None = None, progress: bool = True,
             overwrite: bool = False) -> dict:
    """Pretrain a tiny MoE from scratch on `testbed`'s corpus; returns pretrain_log.json's dict.

    A pretrained model in `output_dir` is refused unless `overwrite`."""
    import transformers
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainingArguments

    from .tiny import TINY_ARCHS

    testbed = Path(testbed)
    artifacts.claim(output_dir, "pretrain_log.json", overwrite)
    if not (testbed / "testbed.json").is_file():
        raise FileNotFoundError(f"{testbed}: no testbed.json (run `sara testbed build --output-dir {testbed}`)")
    if cfg is None:
        cfg = TestbedConfig(**json.loads((testbed / "testbed_config.json").read_text()))
    if cfg.arch not in TINY_ARCHS:
        raise ValueError(f"--arch {cfg.arch!r}: choose one of {sorted(TINY_ARCHS)}")
    tokenizer = AutoTokenizer.from_pretrained(testbed / "tokenizer")
    resolved = artifacts.config_dict(PretrainConfig(**asdict(_knobs(cfg)), testbed=str(testbed),
                                                    output_dir=str(output_dir), overwrite=overwrite))
    routed = cfg.route_weight > 0  # weight 0 takes the plain path: bit-identical to a world without the knob
    if cfg.route_weight < 0 or not math.isfinite(cfg.route_weight):
        raise ValueError(f"field route_weight: {cfg.route_weight}; use a finite weight >= 0 (0 = off)")
    if routed:
        langs = json.loads((testbed / "testbed.json").read_text())["langs"]
        blocks, groups = packed_blocks(testbed, tokenizer, cfg.seq_len, cfg.route_by, langs)
        dataset = Dataset.from_dict({"input_ids": blocks, "labels": blocks, "route_group": groups})
    else:
        blocks = packed_blocks(testbed, tokenizer, cfg.seq_len)
        dataset = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    torch.manual_seed(cfg.seed)
    model = getattr(transformers, TINY_ARCHS[cfg.arch][1])(model_config(cfg, len(tokenizer)))
    with artifacts.publishing(output_dir, overwrite, primary="pretrain_log.json") as staging:
        args = TrainingArguments(output_dir=str(staging / "trainer"), max_steps=cfg.max_steps,
                                 per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                                 lr_scheduler_type="cosine", warmup_steps=min(50, cfg.max_steps // 10), weight_decay=0.0,
                                 logging_steps=max(1, cfg.max_steps // 20), save_strategy="no", report_to="none",
                                 seed=cfg.seed, data_seed=cfg.seed, dataloader_num_workers=0, disable_tqdm=not progress,
                                 use_cpu=not torch.cuda.is_available(), remove_unused_columns=not routed)
        if routed:
            trainer = RoutedPretrainer(model=model, args=args, train_dataset=dataset, route_weight=cfg.route_weight,
                                       route_layers=list(cfg.route_layers), membership=expert_groups(cfg, len(langs)))
        else:
            trainer = Trainer(model=model, args=args, train_dataset=dataset)
        start = time.time()
        trainer.train()
        seconds = time.time() - start
        shutil.rmtree(staging / "trainer", ignore_errors=True)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        route_losses = [h["route_loss"] for h in trainer.state.log_history if "route_loss" in h]
        model.eval()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        log = {"arch": cfg.arch, "steps": cfg.max_steps, "blocks": len(blocks), "seq_len": cfg.seq_len,
               "parameters": sum(p.numel() for p in model.parameters()), "losses": losses,
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "route_losses": route_losses, "final_route_loss": route_losses[-1] if route_losses else None,
               "seconds": round(seconds, 1), "testbed": str(testbed), "config": resolved,
               "metadata": artifacts.run_metadata(seed=cfg.seed)}
        (staging / "pretrain_config.json").write_text(json.dumps(resolved, indent=2))
        (staging / "pretrain_log.json").write_text(json.dumps(log, indent=2))
    return log


class RoutedPretrainer(Trainer):
    """Trainer whose loss adds `route_weight x route_loss` on the routers of `route_layers`
    (read through `routing.RouterRecorder`, so any family the project reads works)."""

    def __init__(self, *args, route_weight: float, route_layers: list, membership, **kwargs):
        super().__init__(*args, **kwargs)
        self.route_weight, self.membership = route_weight, membership
        self.recorder = RouterRecorder(self.model, route_layers)
        self._route_log: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        groups = inputs.pop("route_group")
        with self.recorder:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        term = route_loss(self.recorder.probabilities(torch.ones_like(groups)), groups, self.membership)
        self.recorder.clear()
        self._route_log.append(float(term.detach()))
        loss = loss + self.route_weight * term
        return (loss, result[1]) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if self._route_log and "loss" in logs:
            logs["route_loss"] = round(sum(self._route_log) / len(self._route_log), 4)
            self._route_log = []
        super().log(logs, *args, **kwargs)



# ----------------------------------------------------------------------------- CLI


@dataclass
class BuildConfig(TestbedConfig):
    """Options of `sara testbed build`: the world's knobs (`TestbedConfig`) and where to write it."""

    output_dir: str | None = field(default=None, metadata={"help": "folder for the testbed", "required": True})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing testbed in output_dir"})


@dataclass
class PretrainConfig(TestbedConfig):
    """Options of `sara testbed pretrain`: the knobs (defaults: the testbed's testbed_config.json), testbed, output."""

    testbed: str | None = field(default=None, metadata={"help": "a built testbed folder", "required": True})
    output_dir: str | None = field(default=None, metadata={"help": "folder for the pretrained model", "required": True})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing model in output_dir"})


def _knobs(cfg) -> TestbedConfig:
    return TestbedConfig(**{f.name: getattr(cfg, f.name) for f in fields(TestbedConfig)})


def build_cli(argv=None) -> int:
    from .cli import parse_config

    cfg = parse_config(BuildConfig, argv, "sara testbed build", "Generate the world, corpora, eval sets and tokenizer.")
    info = build(_knobs(cfg), cfg.output_dir, cfg.overwrite)
    print(f"testbed built in {cfg.output_dir}: {json.dumps(info['counts'])}")
    return 0


def pretrain_cli(argv=None) -> int:
    from .cli import parse_config

    def built(first):  # the testbed's knobs are the defaults; --config and flags override them
        path = Path(first.testbed) / "testbed_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    cfg = parse_config(PretrainConfig, argv, "sara testbed pretrain",
                       "Pretrain a tiny MoE from scratch on a built testbed.", defaults=built)
    log = pretrain(cfg.testbed, cfg.output_dir, cfg, overwrite=cfg.overwrite)
    print(f"pretrained {log['parameters']} parameters for {log['steps']} steps in {log['seconds']} s: "
          f"loss {log['first_loss']:.3f} -> {log['final_loss']:.3f}; model saved to {cfg.output_dir}")
    return 0


def testbed_cli(argv=None) -> int:
    from .cli import dispatch

    return dispatch("sara testbed", __doc__.split("\n\n")[0], {
        "build": ("generate the world, corpora, eval sets and tokenizer", build_cli),
        "pretrain": ("pretrain a tiny MoE from scratch on a built testbed", pretrain_cli)}, argv)
