"""The cloned-language testbed: a synthetic world, its corpora and a tiny MoE pretrained on it.

    sara testbed build --output_dir runs/testbed [--config configs/testbed.yaml] [--seed 0]
    sara testbed pretrain --testbed runs/testbed --output_dir runs/base [--arch qwen3_moe] [--max_steps 600]

    from sara_moe.testbed.build import TestbedConfig, build
    from sara_moe.testbed.pretrain import pretrain
    info = build(TestbedConfig(seed=0), "runs/testbed")
    pretrain("runs/testbed", "runs/base")

`build` writes (world in `testbed.world`): `tokenizer/` (word-level HF tokenizer),
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
flag or `--config` YAML key (`BuildConfig`, `pretrain.PretrainConfig`); pretrain's defaults are the
testbed's `testbed_config.json`.

`pretrain` (in `testbed.pretrain`) trains a tiny MoE on it, with the optional routing knob.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields

from sara_moe.data.corpus import PLAIN_TEMPLATE
from sara_moe.runtime import artifacts
from sara_moe.runtime.options import parse_config
from sara_moe.testbed.world import ATTRS, Clone, World

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
    max_steps: int = field(default=1200, metadata={"help": "pretraining steps (with learn_until: at most)"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    # how long pretraining runs: learn_until 0 = a cosine schedule over max_steps; > 0 = constant lr
    # until that share of the English dev facts (both splits) is known, checked every check_every
    # steps, then a linear cool-down over cooldown_steps (testbed.pretrain.KnowledgeGate)
    learn_until: float = field(default=0.0, metadata={
        "help": "English dev facts known (share) that ends the constant-lr phase; 0 = cosine over max_steps"})
    check_every: int = field(default=100, metadata={"help": "steps between knowledge checks (learn_until)"})
    cooldown_steps: int = field(default=300, metadata={"help": "linear lr decay after the facts are known"})
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


# ----------------------------------------------------------------------------- CLI


@dataclass
class BuildConfig(TestbedConfig):
    """Options of `sara testbed build`: the world's knobs (`TestbedConfig`) and where to write it."""

    output_dir: str | None = field(default=None, metadata={"help": "folder for the testbed", "required": True})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing testbed in output_dir"})


def world_knobs(cfg) -> TestbedConfig:
    """The world's knobs (a `TestbedConfig`) of a `BuildConfig` or `PretrainConfig`."""
    return TestbedConfig(**{f.name: getattr(cfg, f.name) for f in fields(TestbedConfig)})


def build_cli(argv=None) -> int:
    cfg = parse_config(BuildConfig, argv, "sara testbed build", "Generate the world, corpora, eval sets and tokenizer.")
    info = build(world_knobs(cfg), cfg.output_dir, cfg.overwrite)
    print(f"testbed built in {cfg.output_dir}: {json.dumps(info['counts'])}")
    return 0
