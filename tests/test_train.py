"""`sara train`: the alignment term, masking, anchors, gradients, SFT equivalence, modes, resume, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from sara_moe import priors as P
from sara_moe.data.corpus import CorpusError
from sara_moe.train import SaraConfig, SaraTrainer, build_trainer, train

ARCHS = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]


@pytest.fixture(scope="session")
def priors_path(tiny_model_dir, example_corpus, tmp_path_factory):
    cache = {}

    def make(arch: str):
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"priors_{arch}") / "priors.safetensors"
            cache[arch] = P.extract_priors(str(tiny_model_dir(arch)), example_corpus, out, progress=False)
        return cache[arch]

    return make


def config(tmp_path, model_dir, corpus, priors=None, **overrides) -> SaraConfig:
    base = dict(output_dir=str(tmp_path / "run"), model_name_or_path=str(model_dir), data=str(corpus),
                priors=str(priors) if priors else None, report_to="none", max_steps=3, per_device_train_batch_size=4,
                save_strategy="no", gradient_checkpointing=False, disable_tqdm=True, seed=0, learning_rate=1e-3,
                lr_scheduler_type="constant", dataloader_num_workers=0)
    return SaraConfig(**{**base, **overrides})


# Private names of HF/TRL's Trainer that these tests (and those importing these helpers) use, for want of a
# public equivalent: `_prepare_inputs` (the device placement `training_step` runs on a collated batch),
# `_metrics` (TRL's buffer of per-call values; the public `log_history` only holds their mean at the next
# log) and `_load_from_checkpoint` (the weight restore of `train(resume_from_checkpoint=...)`, on its own).
def first_batch(trainer: SaraTrainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def js_inline(p, q):
    p, q = p.float().clamp_min(1e-8), q.float().clamp_min(1e-8)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p.log() - m.log())).sum(-1) + 0.5 * (q * (q.log() - m.log())).sum(-1)


def expected_js(model, batch, table, moe_layers, align, sigmoid, rows=None):
    """Recompute the alignment term from `output_router_logits` (not from the recorder)."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    mask = batch["attention_mask"].float()
    bsz, seq = mask.shape
    per_layer = []
    for layer in align:
        logits = out.router_logits[moe_layers.index(layer)].float().view(bsz, seq, -1)
        dist = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True) if sigmoid else logits.softmax(-1)
        pooled = (dist * mask[..., None]).sum(1) / mask.sum(1)[:, None]
        prior_rows = batch["sara_prior_row"] if rows is None else rows
        per_layer.append(js_inline(pooled, table[prior_rows.clamp_min(0), moe_layers.index(layer)]))
    per_example = torch.stack(per_layer, -1).mean(-1)
    valid = batch["sara_has_anchor"].float()
    return float((per_example * valid).sum() / valid.sum())


@pytest.mark.parametrize("arch", ARCHS)
def test_js_term_matches_independent_recomputation(arch, tiny_model_dir, priors_path, example_corpus, tmp_path):
    trainer, stats = build_trainer(config(tmp_path, tiny_model_dir(arch), example_corpus, priors_path(arch),
                                          lambda_js=1.5, train_anchor=True))
    assert stats["examples"] == 60 and stats["without_anchor"] == 20  # 20 groups x (sw, es, en)
    cache = P.load_priors(priors_path(arch))
    model = trainer.model.eval()
    batch = first_batch(trainer)
    assert trainer.align_layers == [1, 2]
    want = expected_js(model, batch, cache.table, cache.layers, [1, 2], sigmoid=arch == "deepseek_v3")
    with torch.no_grad():
        loss_sara = trainer.compute_loss(model, dict(batch))
        got = trainer._metrics["eval"]["js_loss"][-1]
        trainer.args.lambda_js = 0.0
        loss_sft = trainer.compute_loss(model, dict(batch))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-7) and want > 1e-4
    assert float(loss_sara - loss_sft) == pytest.approx(1.5 * want, rel=1e-4)
    assert {"ce_loss", "js_loss", "aux_loss"} <= set(trainer._metrics["eval"])


@pytest.mark.parametrize("direction", ["anchor_target", "target_anchor"])
def test_kl_divergence_option(direction, tiny_model_dir, priors_path, example_corpus, tmp_path):
    trainer, _ = build_trainer(config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus, priors_path("qwen3_moe"),
                                      divergence="kl", kl_direction=direction, align_layers="2"))
    cache, model = P.load_priors(priors_path("qwen3_moe")), trainer.model.eval()
    batch = first_batch(trainer)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
        mask = batch["attention_mask"].float()[..., None]
        target = (out.router_logits[2].view(*mask.shape[:2], -1).softmax(-1) * mask).sum(1) / mask.sum(1)
        anchor = cache.table[batch["sara_prior_row"], 2]
        p, q = (anchor, target) if direction == "anchor_target" else (target, anchor)  # KL(p || q)
        kl = (p.clamp_min(1e-8) * (p.clamp_min(1e-8).log() - q.clamp_min(1e-8).log())).sum(-1).mean()
        reverse = (q.clamp_min(1e-8) * (q.clamp_min(1e-8).log() - p.clamp_min(1e-8).log())).sum(-1).mean()
        trainer.compute_loss(model, dict(batch))
    assert trainer._metrics["eval"]["kl_loss"][-1] == pytest.approx(float(kl), rel=1e-4)
    assert abs(float(kl) - float(reverse)) > 1e-4 and "js_loss" not in trainer._metrics["eval"]


def test_online_anchor_grad_sends_gradient_through_the_anchor(tiny_model_dir, example_corpus, tmp_path):
    """Bandarkar et al. do not detach English: with online_anchor_grad the anchor forward adds router gradient."""
    grads, values = {}, {}
    for grad in (False, True):
        trainer, _ = build_trainer(config(tmp_path / str(grad), tiny_model_dir("qwen3_moe"), example_corpus,
                                          anchor_mode="online", online_anchor_grad=grad, divergence="kl",
                                          lambda_js=1.0, align_layers="1"))
        model = trainer.model.train()
        model.zero_grad()
        trainer.compute_loss(model, dict(first_batch(trainer))).backward()
        grads[grad] = model.model.layers[1].mlp.gate.weight.grad.clone()
        values[grad] = trainer._metrics["train"]["kl_loss"][-1]
    assert values[True] == pytest.approx(values[False], rel=1e-4)  # same value, no dropout in the tiny model
    assert (grads[True] - grads[False]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="online_anchor_grad: needs anchor_mode online"):
        config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus, online_anchor_grad=True)


def test_masked_examples_contribute_zero(tiny_model_dir, priors_path, example_corpus, tmp_path):
    trainer, _ = build_trainer(config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus, priors_path("qwen3_moe")))
    model, cache = trainer.model.eval(), P.load_priors(priors_path("qwen3_moe"))
    batch = first_batch(trainer)
    batch["sara_has_anchor"] = torch.tensor([True, False, True, False])
    with torch.no_grad():
        trainer.compute_loss(model, dict(batch))
        masked = trainer._metrics["eval"]["js_loss"][-1]
        zeros = torch.zeros_like(trainer.prior_table[:1])  # what the authors' bug pulls masked rows toward
        trainer.prior_table = torch.cat([trainer.prior_table, zeros])
        pointed = dict(batch, sara_prior_row=batch["sara_prior_row"].clone())
        pointed["sara_prior_row"][[1, 3]] = len(trainer.prior_table) - 1
        trainer.compute_loss(model, pointed)
        assert trainer._metrics["eval"]["js_loss"][-1] == masked
        assert masked == pytest.approx(expected_js(model, batch, cache.table, cache.layers, [1, 2], False), rel=1e-4)
        batch["sara_has_anchor"] = torch.zeros(4, dtype=torch.bool)
        loss_none = trainer.compute_loss(model, dict(batch))
        trainer.args.lambda_js = 0.0
        assert torch.equal(loss_none, trainer.compute_loss(model, dict(batch)))
    assert trainer._metrics["eval"]["js_loss"][-2] == 0.0


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_cached_and_online_agree_at_step_zero(arch, tiny_model_dir, priors_path, example_corpus, tmp_path):
    values = {}
    for mode in ("cached", "online"):
        trainer, _ = build_trainer(config(tmp_path, tiny_model_dir(arch), example_corpus, priors_path(arch),
                                          anchor_mode=mode, train_anchor=True))
        batch = first_batch(trainer)
        trainer.model.train()
        trainer.compute_loss(trainer.model, dict(batch))
        values[mode] = trainer._metrics["train"]["js_loss"][-1]
    assert values["online"] == pytest.approx(values["cached"], rel=1e-4) and values["cached"] > 0


def test_router_weights_get_gradient_from_js(tiny_model_dir, priors_path, example_corpus, tmp_path):
    grads = {}
    for lam in (0.0, 1.0):
        trainer, _ = build_trainer(config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus,
                                          priors_path("qwen3_moe"), lambda_js=lam, gradient_checkpointing=True))
        model = trainer.model.train()
        model.zero_grad()
        trainer.compute_loss(model, dict(first_batch(trainer))).backward()
        grads[lam] = {i: model.model.layers[i].mlp.gate.weight.grad.clone() for i in range(4)}
    for layer in (1, 2):  # aligned: the JS term adds gradient
        assert (grads[1.0][layer] - grads[0.0][layer]).abs().max() > 1e-6
    assert torch.allclose(grads[1.0][3], grads[0.0][3], atol=1e-7)  # after the band: JS cannot reach it


def test_lambda_zero_is_exactly_sft(tiny_model_dir, priors_path, example_corpus, tmp_path):
    from trl import SFTTrainer

    cfg = config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus, priors_path("qwen3_moe"), lambda_js=0.0)
    sara, _ = build_trainer(cfg)
    plain_data = sara.train_dataset.remove_columns([c for c in sara.train_dataset.column_names if c.startswith("sara_")])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen3_moe"))
    cfg_plain = config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus, lambda_js=0.0)
    plain = SFTTrainer(model=model, args=cfg_plain, train_dataset=plain_data, processing_class=sara.processing_class)
    sara.train()
    plain.train()
    for (name, a), (_, b) in zip(sara.model.named_parameters(), plain.model.named_parameters()):
        assert torch.equal(a, b), name
    assert all("js_loss" in h for h in sara.state.log_history if "loss" in h)


def aligned_js(trainer) -> float:
    """Mean JS of the aligned layers to the priors over the whole training set (eval mode)."""
    model, values = trainer.model.eval(), []
    loader = trainer.get_train_dataloader()
    with torch.no_grad():
        for batch in loader:
            trainer.compute_loss(model, dict(trainer._prepare_inputs(batch)))
            values.append(trainer._metrics["eval"]["js_loss"][-1])
    return sum(values) / len(values)


def test_js_falls_more_with_alignment(tiny_model_dir, priors_path, example_corpus, tmp_path):
    drops = {}
    for lam in (0.0, 3.0):
        trainer, _ = build_trainer(config(tmp_path / str(lam), tiny_model_dir("qwen3_moe"), example_corpus,
                                          priors_path("qwen3_moe"), lambda_js=lam, max_steps=30, learning_rate=3e-3))
        before = aligned_js(trainer)
        trainer.train()
        drops[lam] = (before, aligned_js(trainer))
    (b0, a0), (b1, a1) = drops[0.0], drops[3.0]
    assert b0 == pytest.approx(b1)
    print("aligned JS before -> after: lambda 0", drops[0.0], "lambda 3", drops[3.0])
    assert a1 < 0.7 * b1 and (b1 - a1) > 2 * (b0 - a0)


def test_lora_and_routers_only_runs_train(tiny_model_dir, priors_path, example_corpus, tmp_path):
    cfg = config(tmp_path, tiny_model_dir("mixtral"), example_corpus, priors_path("mixtral"), use_peft=True,
                 max_steps=2)
    trainer = train(cfg)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("self_attn.q_proj.lora_A" in n for n in names)
    assert any("experts" in n and "lora" in n for n in names) and any("mlp.gate" in n and "lora" in n for n in names)
    assert (tmp_path / "run" / "adapter_config.json").is_file()
    logs = [h for h in trainer.state.log_history if "js_loss" in h]
    assert len(logs) == 2 and all(h["js_loss"] > 0 and h["ce_loss"] > 0 for h in logs)
    cfg = config(tmp_path / "r", tiny_model_dir("mixtral"), example_corpus, priors_path("mixtral"),
                 routers_only=True, max_steps=2)
    trainer = train(cfg)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral")).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "run").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed)


class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(state.global_step)


class PoisonAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step == 2:
            with torch.no_grad():
                model.model.layers[0].mlp.gate.weight.fill_(float("nan"))


def test_resume_and_nan_stop(tiny_model_dir, priors_path, example_corpus, tmp_path):
    cfg = config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus, priors_path("qwen3_moe"), max_steps=4,
                 save_strategy="steps", save_steps=2)
    train(cfg)
    cfg = config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus, priors_path("qwen3_moe"), max_steps=6,
                 save_strategy="steps", save_steps=2)
    trainer, _ = build_trainer(cfg)
    # resuming restores every weight of the checkpoint, fused experts included
    from transformers import AutoModelForCausalLM
    trainer._load_from_checkpoint(str(tmp_path / "run" / "checkpoint-4"))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-4").state_dict()
    current = trainer.model.state_dict()
    assert any(".experts." in name for name in saved)
    for name, tensor in saved.items():
        assert torch.equal(current[name], tensor), name
    steps_run = StepCounter()
    trainer.add_callback(steps_run)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    trainer.save_state()
    assert trainer.state.global_step == 6 and steps_run.steps == [5, 6]
    logged = [h["step"] for h in trainer.state.log_history if "js_loss" in h]
    assert logged == [1, 2, 3, 4, 5, 6]  # history of the first run carried over from checkpoint-4
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    checkpoint = tmp_path / "run" / "checkpoint-4"  # no pickled training args; JSON instead
    assert not (checkpoint / "training_args.bin").exists()
    assert json.loads((checkpoint / "training_args.json").read_text())["max_steps"] == 4
    cfg = config(tmp_path / "nan", tiny_model_dir("qwen3_moe"), example_corpus, priors_path("qwen3_moe"), max_steps=5,
                 save_strategy="steps", save_steps=2)
    trainer, _ = build_trainer(cfg)
    trainer.add_callback(PoisonAtStep())
    with pytest.raises(ValueError, match=r"^step 3: loss is nan on batch \[\w+:\w+, ") as err:
        trainer.train()
    assert "\n" not in str(err.value)
    ckpt = tmp_path / "nan" / "run" / "checkpoint-2"
    assert ckpt.is_dir() and not (tmp_path / "nan" / "run" / "checkpoint-3").exists()
    weights = AutoModelForCausalLM.from_pretrained(ckpt).model.layers[0].mlp.gate.weight
    assert torch.isfinite(weights).all()


def test_bad_inputs(tiny_model_dir, priors_path, example_corpus, tmp_path):
    ds = tiny_model_dir("deepseek_v3")  # layer 0 is dense
    trainer, _ = build_trainer(config(tmp_path, ds, example_corpus, priors_path("deepseek_v3"), align_layers="-2--1"))
    assert trainer.align_layers == [2, 3]  # the trainer reads align_layers through the one parser
    with pytest.raises(ValueError, match=r"^field align_layers: layer\(s\) \[0\] are dense \(no router\)"):
        build_trainer(config(tmp_path, ds, example_corpus, priors_path("deepseek_v3"), align_layers="0,1"))
    with pytest.raises(CorpusError, match=r"training language\(s\) \['yo'\] appear in no group"):
        build_trainer(config(tmp_path, ds, example_corpus, priors_path("deepseek_v3"), train_langs="sw,yo"))
    with pytest.raises(ValueError, match=r"priors\.safetensors: prior cache does not match .*model_config"):
        build_trainer(config(tmp_path, ds, example_corpus, priors_path("qwen3_moe")))
    with pytest.raises(ValueError, match="pooling: cache 'all' vs run 'response'"):
        build_trainer(config(tmp_path, ds, example_corpus, priors_path("deepseek_v3"), pooling="response"))
    with pytest.raises(ValueError, match="field priors: anchor_mode 'cached' needs"):
        build_trainer(config(tmp_path, ds, example_corpus))
    with pytest.raises(ValueError, match="field anchor_mode: 'offline'"):
        config(tmp_path, ds, example_corpus, anchor_mode="offline")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"id": "s01", "en": "The cat sleeps on the warm mat.", "sw": "Paka."}\n{"id": "x", "sw": "Maji."}\n')
    with pytest.raises(CorpusError, match=r"missing\.jsonl:2: field 'en' \(the anchor language\) is missing"):
        build_trainer(config(tmp_path, ds, missing, priors_path("deepseek_v3")))


def test_cli_yaml_overrides_and_outputs(tiny_model_dir, priors_path, example_corpus, tmp_path):
    from sara_moe.cli import main

    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"model_name_or_path: {tiny_model_dir('gpt_oss')}\ndata: {example_corpus}\n"
                        f"priors: {priors_path('gpt_oss')}\nlambda_js: 2.0\nmax_steps: 2\ntrain_langs: [sw]\n"
                        "report_to: none\ngradient_checkpointing: true\nper_device_train_batch_size: 4\n")
    out = tmp_path / "out"
    assert main(["train", "--config", str(run_yaml), "--output_dir", str(out), "--lambda_js", "0.5",
                 "--align_layers", "1-2"]) == 0
    resolved = json.loads((out / "sara_config.json").read_text())  # the SaraConfig after YAML and flags
    assert resolved["lambda_js"] == 0.5 and resolved["align_layers"] == ["1-2"] and resolved["max_steps"] == 2
    assert resolved["train_langs"] == "sw" and resolved["output_dir"] == str(out)
    run = json.loads((out / "sara_run.json").read_text())
    assert run["align_layers_resolved"] == [1, 2] and run["data_stats"]["examples"] == 20
    assert run["scoring"]["rule"] == "softmax" and run["scoring"]["selection_bias"] is False
    assert run["metadata"]["config"] == resolved
    state = json.loads((out / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "ce_loss" in h and "js_loss" in h] == [1, 2]
    AutoModelForCausalLM.from_pretrained(out)
    assert main(["train", "--config", str(run_yaml), "--output_dir", str(tmp_path / "o2"), "--align_layers", "9"]) == 1


def test_two_process_gloo_run(tiny_model_dir, priors_path, example_corpus, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SARA_TEST_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sara_moe.cli", "train", "--model_name_or_path", str(tiny_model_dir("qwen3_moe")),
           "--data", str(example_corpus), "--priors", str(priors_path("qwen3_moe")), "--output_dir", str(out),
           "--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none",
           "--gradient_checkpointing", "false", "--ddp_backend", "gloo", "--use_cpu", "true", "--anchor_mode", "online"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 2
    logs = [h for h in state["log_history"] if "js_loss" in h]
    assert len(logs) == 2 and all(h["js_loss"] > 0 for h in logs)
    run = json.loads((out / "sara_run.json").read_text())
    assert run["world_size"] == 2 and run["data_stats"]["examples"] == 40


def test_checkpointing_default_without_deprecation_warning(tmp_path):
    """TRL turns activation checkpointing on by default; SaraConfig keeps that, and the user's choice
    under either name, without transformers 5's warning about the old `gradient_checkpointing` name."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        configs = [SaraConfig(output_dir=str(tmp_path), **kw) for kw in
                   ({}, {"gradient_checkpointing": False}, {"activation_checkpointing": False})]
    assert [(c.activation_checkpointing, c.gradient_checkpointing) for c in configs] == [
        (True, True), (False, False), (False, False)]
    assert configs[0].activation_checkpointing_kwargs == {"use_reentrant": False}
