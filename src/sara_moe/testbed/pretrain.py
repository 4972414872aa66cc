"""Pretraining on a built testbed: a tiny MoE from scratch, with the optional routing knob (`sara testbed pretrain`).

    from sara_moe.testbed.pretrain import pretrain
    log = pretrain("runs/testbed", "runs/base")      # cfg defaults: the testbed's testbed_config.json

`pretrain` trains a random-init tiny MoE (`tiny.tiny_config`, scaled by `hidden_size`) with
transformers' Trainer on packed `seq_len`-token blocks, load-balancing loss on, and saves an
ordinary HF model dir + tokenizer + `pretrain_log.json` + `pretrain_config.json` (the
resolved `PretrainConfig`). The **routing knob** (`route_weight` > 0) adds `route_weight x
route_loss`: on the MoE layers `route_layers`, the mean over supervised tokens of -log(router
mass on the token's expert group), where the experts are split evenly into one group per
language (`route_by: lang`) or per (language, topic) (`lang_topic`, fact-sentence words only).
Router distributions are read through `routing.RouterRecorder`, so any family the project
reads works; weight 0 takes the plain Trainer path, bit-identical to a world without the knob.

**How long it trains.** `learn_until` 0: a cosine schedule over exactly `max_steps`. `learn_until`
> 0 (the experiment's worlds): warm-up, then a constant learning rate until the model knows
`learn_until` of the English *dev* facts of both splits (scored as the pretraining sentences that
state them, `fact_knowledge`, every `check_every` steps), then a linear cool-down over
`cooldown_steps`; `max_steps` caps the whole run (the cool-down then starts at `max_steps -
cooldown_steps`). Why: a world's base model sits on a loss plateau, knowing no fact better than
chance, for a number of steps that depends on its seed (a few hundred to over a thousand); under a
fixed cosine schedule a late escape meets a decayed learning rate and the world stays half-learned.
Test items are never read. `KnowledgeGate` holds the schedule; `pretrain_log.json` records every check.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from sara_moe.data.corpus import token_ids
from sara_moe.routing import RouterRecorder
from sara_moe.runtime import artifacts
from sara_moe.runtime.options import parse_config
from sara_moe.testbed.build import ROUTE_BY, TOPIC_CODE, TOPICS, TestbedConfig, world_knobs
from sara_moe.testbed.world import ANSWER_PREFIX

SPLITS = ("shared", "en_only")


@dataclass
class PretrainConfig(TestbedConfig):
    """Options of `sara testbed pretrain`: the knobs (defaults: the testbed's testbed_config.json), testbed, output."""

    testbed: str | None = field(default=None, metadata={"help": "a built testbed folder", "required": True})
    output_dir: str | None = field(default=None, metadata={"help": "folder for the pretrained model", "required": True})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing model in output_dir"})


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
            ids = token_ids(doc["text"], tokenizer, True) + [tokenizer.eos_token_id]
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


def dev_facts(testbed) -> list[dict]:
    """The English dev facts of both splits as pretraining states them: {key, split, choices, answer},
    each choice the fact sentence alone (the eval item's answer without `ANSWER_PREFIX`)."""
    rows = []
    for split in SPLITS:
        for line in (Path(testbed) / f"eval_mc_{split}.jsonl").read_text(encoding="utf-8").splitlines():
            item = json.loads(line) if line.strip() else None
            if item and item["lang"] == "en" and item["part"] == "dev":
                rows.append({"key": f"en|{item['id']}", "split": split, "answer": item["answer"],
                             "choices": [c.removeprefix(ANSWER_PREFIX).strip() for c in item["choices"]]})
    return rows


def fact_knowledge(model, tokenizer, facts: list[dict], batch_size: int = 64) -> dict:
    """Share of `facts` (`dev_facts`) whose true sentence has the highest summed log-likelihood, per split."""
    from sara_moe.evaluation.evaluate import loglikelihoods

    requests = [("\n", choice) for fact in facts for choice in fact["choices"]]
    was_training = model.training
    model.eval()
    lls = loglikelihoods(model, tokenizer, requests, batch_size, desc="fact knowledge")
    model.train(was_training)
    hits, start = {split: [] for split in SPLITS}, 0
    for fact in facts:
        n = len(fact["choices"])
        hits[fact["split"]].append(int(max(range(n), key=lambda k: lls[start + k]) == fact["answer"]))
        start += n
    return {split: sum(v) / len(v) for split, v in hits.items() if v}


class KnowledgeGate(TrainerCallback):
    """The `learn_until` schedule: warm-up, constant learning rate until the English dev facts are known
    (checked every `check_every` steps), then a linear cool-down of `cooldown` steps; `max_steps` caps it."""

    def __init__(self, facts: list[dict], tokenizer, target: float, check_every: int, cooldown: int,
                 max_steps: int, warmup: int):
        if not 0 < target <= 1:
            raise ValueError(f"field learn_until: {target}; use a share of facts in (0, 1] (0 = fixed schedule)")
        if check_every < 1 or cooldown < 1 or max_steps < warmup + cooldown:
            raise ValueError(f"fields check_every {check_every}, cooldown_steps {cooldown}, max_steps {max_steps}: "
                             f"need check_every >= 1, cooldown_steps >= 1, max_steps >= {warmup} + cooldown_steps")
        self.facts, self.tokenizer, self.target = facts, tokenizer, target
        self.check_every, self.cooldown, self.max_steps, self.warmup = check_every, cooldown, max_steps, warmup
        self.decay_from: int | None = None  # set when the facts are known; else the cap decides
        self.checks: list[dict] = []

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate for optimizer step `step` (0-based): the smaller of the
        warm-up ramp (as transformers' warm-up schedules) and the cool-down."""
        ramp = step / self.warmup if step < self.warmup else 1.0
        start = self.decay_from if self.decay_from is not None else self.max_steps - self.cooldown
        return min(ramp, 1.0 if step < start else max(0.0, (start + self.cooldown - step) / self.cooldown))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if self.decay_from is None and step % self.check_every == 0 and step < self.max_steps - self.cooldown:
            known = fact_knowledge(model, self.tokenizer, self.facts)
            self.checks.append({"step": step, **{k: round(v, 4) for k, v in known.items()}})
            if known and min(known.values()) >= self.target:
                self.decay_from = step
        if self.decay_from is not None and step >= self.decay_from + self.cooldown:
            control.should_training_stop = True
        return control


class Pretrainer(Trainer):
    """Trainer whose learning rate follows a `KnowledgeGate` when one is given (else the args' schedule)."""

    def __init__(self, *args, gate: KnowledgeGate | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = gate
        if gate is not None:
            self.add_callback(gate)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.gate is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:  # a LambdaLR, as transformers' own schedules are
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.gate.lr_factor)
        return self.lr_scheduler


def model_config(cfg: TestbedConfig, vocab_size: int):
    from sara_moe.architectures.tiny import TINY_ARCHS, tiny_config

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

    from sara_moe.architectures.tiny import TINY_ARCHS

    testbed = Path(testbed)
    artifacts.claim(output_dir, "pretrain_log.json", overwrite)
    if not (testbed / "testbed.json").is_file():
        raise FileNotFoundError(f"{testbed}: no testbed.json (run `sara testbed build --output-dir {testbed}`)")
    if cfg is None:
        cfg = TestbedConfig(**json.loads((testbed / "testbed_config.json").read_text()))
    if cfg.arch not in TINY_ARCHS:
        raise ValueError(f"--arch {cfg.arch!r}: choose one of {sorted(TINY_ARCHS)}")
    tokenizer = AutoTokenizer.from_pretrained(testbed / "tokenizer")
    resolved = artifacts.config_dict(PretrainConfig(**asdict(world_knobs(cfg)), testbed=str(testbed),
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
    warmup = min(50, cfg.max_steps // 10)
    gate = KnowledgeGate(dev_facts(testbed), tokenizer, cfg.learn_until, cfg.check_every, cfg.cooldown_steps,
                         cfg.max_steps, warmup) if cfg.learn_until else None
    torch.manual_seed(cfg.seed)
    model = getattr(transformers, TINY_ARCHS[cfg.arch][1])(model_config(cfg, len(tokenizer)))
    with artifacts.publishing(output_dir, overwrite, primary="pretrain_log.json") as staging:
        args = TrainingArguments(output_dir=str(staging / "trainer"), max_steps=cfg.max_steps,
                                 per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                                 lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=0.0,
                                 logging_steps=max(1, cfg.max_steps // 20), save_strategy="no", report_to="none",
                                 seed=cfg.seed, data_seed=cfg.seed, dataloader_num_workers=0, disable_tqdm=not progress,
                                 use_cpu=not torch.cuda.is_available(), remove_unused_columns=not routed)
        if routed:
            trainer = RoutedPretrainer(model=model, args=args, train_dataset=dataset, route_weight=cfg.route_weight,
                                       route_layers=list(cfg.route_layers), membership=expert_groups(cfg, len(langs)),
                                       gate=gate)
        else:
            trainer = Pretrainer(model=model, args=args, train_dataset=dataset, gate=gate)
        start = time.time()
        trainer.train()
        seconds = time.time() - start
        shutil.rmtree(staging / "trainer", ignore_errors=True)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        route_losses = [h["route_loss"] for h in trainer.state.log_history if "route_loss" in h]
        model.eval()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        schedule = {"schedule": "cosine"} if gate is None else {
            "schedule": "learn_until", "knowledge_checks": gate.checks, "cooldown_from": gate.decay_from,
            "reached_target": gate.decay_from is not None,
            "final_knowledge": {k: round(v, 4) for k, v in fact_knowledge(model, tokenizer, gate.facts).items()}}
        log = {"arch": cfg.arch, "steps": trainer.state.global_step, "blocks": len(blocks), "seq_len": cfg.seq_len,
               "parameters": sum(p.numel() for p in model.parameters()), "losses": losses,
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "route_losses": route_losses, "final_route_loss": route_losses[-1] if route_losses else None,
               "learning_rates": [[h["step"], h["learning_rate"]] for h in trainer.state.log_history
                                  if "learning_rate" in h],
               "seconds": round(seconds, 1), **schedule, "testbed": str(testbed), "config": resolved,
               "metadata": artifacts.run_metadata(seed=cfg.seed)}
        (staging / "pretrain_config.json").write_text(json.dumps(resolved, indent=2))
        (staging / "pretrain_log.json").write_text(json.dumps(log, indent=2))
    return log


class RoutedPretrainer(Pretrainer):
    """Pretrainer whose loss adds `route_weight x route_loss` on the routers of `route_layers`
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


def pretrain_cli(argv=None) -> int:
    def built(first):  # the testbed's knobs are the defaults; --config and flags override them
        path = Path(first.testbed) / "testbed_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    cfg = parse_config(PretrainConfig, argv, "sara testbed pretrain",
                       "Pretrain a tiny MoE from scratch on a built testbed.", defaults=built)
    log = pretrain(cfg.testbed, cfg.output_dir, cfg, overwrite=cfg.overwrite)
    print(f"pretrained {log['parameters']} parameters for {log['steps']} steps in {log['seconds']} s: "
          f"loss {log['first_loss']:.3f} -> {log['final_loss']:.3f}; model saved to {cfg.output_dir}")
    return 0
