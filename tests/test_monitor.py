"""Routing monitor during `sara train`: the logged keys against `sara analyze` and an independent recomputation,
TensorBoard, the English-drift guard, the split probe held out of training, and the one-line refusals."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from sara_moe.analysis.analyze import analyze
from sara_moe.data.corpus import CorpusError, read_corpus
from sara_moe.runtime.loading import load_model_and_tokenizer
from sara_moe.train import RoutingMonitor, SaraConfig, build_trainer, train


def base_config(tmp_path, model_dir, corpus, **overrides) -> SaraConfig:
    # online anchors: no priors file, so English drift is measured against the step-0 pass
    base = dict(output_dir=str(tmp_path / "run"), model_name_or_path=str(model_dir), data=str(corpus),
                anchor_mode="online", report_to="none", max_steps=2, per_device_train_batch_size=4,
                save_strategy="no", gradient_checkpointing=False, disable_tqdm=True, seed=0, learning_rate=0.0,
                lr_scheduler_type="constant", dataloader_num_workers=0, monitor_steps=1)
    return SaraConfig(**{**base, **overrides})


def write_probe(path, example_corpus, count=5, drop=(), rename=True):
    """A held-out probe file: the first `count` example groups under new ids (p1, ...), minus `drop` languages."""
    rows = []
    for i, line in enumerate(example_corpus.read_text().splitlines()[:count]):
        row = {k: v for k, v in json.loads(line).items() if k not in drop}
        if rename:
            row["id"] = f"p{i + 1}"
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


def monitor_logs(state_or_trainer) -> dict:
    history = state_or_trainer.state.log_history if hasattr(state_or_trainer, "state") else state_or_trainer
    return {h["step"]: h for h in history if "monitor/english_drift" in h}


def pooled_anchor_routing(model, tokenizer, texts):
    """Mean softmax router distribution per text and MoE layer from `output_router_logits` (not the recorder)."""
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            out = model(input_ids=ids, output_router_logits=True)
            rows.append(torch.stack([logits.float().softmax(-1).mean(0) for logits in out.router_logits]))
    return torch.stack(rows).double()  # [texts, MoE layers, E]


def js_reference(p, q):
    m = 0.5 * (p + q)
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


class TrainModeAfterMonitor(TrainerCallback):
    """Added after the monitor: sees the model right after its pass."""

    def __init__(self, trainer):
        self.trainer, self.modes = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.modes.append(self.trainer.model.training)


def test_learning_rate_zero_drift_is_zero_and_js_equals_analyze(tiny_model_dir, example_corpus, tmp_path):
    model_dir = tiny_model_dir("qwen3_moe")
    probe = write_probe(tmp_path / "probe.jsonl", example_corpus)
    cfg = base_config(tmp_path, model_dir, example_corpus, probe_data=str(probe))
    trainer, _ = build_trainer(cfg)
    spy = TrainModeAfterMonitor(trainer)
    trainer.add_callback(spy)
    trainer.train()
    logs = monitor_logs(trainer)
    assert sorted(logs) == [0, 1, 2]  # the step-0 baseline pass, then every step
    assert spy.modes == [True, True]  # train mode restored after each pass
    assert all(abs(h["monitor/english_drift"]) < 1e-7 for h in logs.values())
    layers = trainer.align_layers
    result = analyze(str(model_dir), probe, tmp_path / "analysis", hidden=False, plots=False, progress=False)
    moe = result["moe_layers"]
    for lang in ("es", "sw"):
        expected = [result["metrics"]["js_pair_mean"][lang][moe.index(layer)] for layer in layers]
        for h in logs.values():
            got = [h[f"monitor/js/{lang}/layer_{layer}"] for layer in layers]
            assert got == pytest.approx(expected, abs=1e-6)
            assert h[f"monitor/js/{lang}"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    # expert load: analyze's dispatched slot counts summed over the probe's languages
    counts = torch.tensor(result["experts"]["counts"], dtype=torch.float64).sum(0)  # [MoE layers, E]
    for layer in layers:
        share = counts[moe.index(layer)] / counts[moe.index(layer)].sum()
        entropy = -sum(float(s) * math.log(float(s)) for s in share if s > 0)
        assert logs[2][f"monitor/load_entropy/layer_{layer}"] == pytest.approx(entropy, abs=1e-6)  # fp32 entropy
        assert logs[2][f"monitor/dead_experts/layer_{layer}"] == float((share == 0).double().mean())
        assert logs[2][f"monitor/english_drift/layer_{layer}"] < 1e-7
    assert all(h["monitor/seconds"] > 0 for h in logs.values())
    # the regular training log still comes every logging step, beside the monitor's entries
    assert [h["step"] for h in trainer.state.log_history if "loss" in h and "ce_loss" in h] == [1, 2]


def test_default_cadence_keeps_the_monitor_within_its_cost_budget(monkeypatch):
    """With monitor_steps none a cadence step gets a pass only if the monitor's time so far plus one more
    pass (as long as the last) stays within monitor_max_cost of the training time so far (fake clock)."""
    from sara_moe.train import monitor as M

    mon = M.RoutingMonitor.__new__(M.RoutingMonitor)
    mon.max_cost, mon._began, mon._spent, mon._last = 0.05, 100.0, 1.0, 1.0  # one 1 s pass so far
    clock = {"now": 0.0}
    monkeypatch.setattr(M.time, "perf_counter", lambda: clock["now"])
    # 2 s of monitor within 5% needs 40 s of training: 100 + 1 (the pass) + 40 s on the clock
    for now, fits in ((120.0, False), (140.9, False), (141.0, True), (200.0, True)):
        clock["now"] = now
        assert mon._fits_budget() is fits, now
    mon.max_cost = None  # an explicit monitor_steps: every cadence step runs
    clock["now"] = 100.5
    assert mon._fits_budget() is True


def test_values_reach_trainer_state_tensorboard_and_sara_run(tiny_model_dir, example_corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    probe = write_probe(tmp_path / "probe.jsonl", example_corpus, count=3)
    cfg = base_config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus, probe_data=str(probe),
                      report_to=["tensorboard"], learning_rate=1e-2, monitor_max_cost=1e6,  # budget never binds
                      monitor_steps=None, logging_steps=2, max_steps=4)
    train(cfg)
    out = tmp_path / "run"
    state = json.loads((out / "trainer_state.json").read_text())
    logs = monitor_logs(state["log_history"])
    assert sorted(logs) == [0, 2, 4]  # default cadence: logging_steps (no evaluation)
    assert logs[4]["monitor/english_drift"] > 1e-6  # it trained (lr 1e-2), so English moved
    events = list(out.rglob("events.out.tfevents.*"))  # TensorBoardCallback's default: output_dir/runs/...
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    for key in ("monitor/english_drift", "monitor/js/sw", "monitor/js/es/layer_1", "monitor/load_entropy/layer_2",
                "monitor/dead_experts/layer_1", "monitor/seconds"):
        scalars = {e.step: e.value for e in acc.Scalars(f"train/{key}")}
        assert sorted(scalars) == [0, 2, 4]
        assert [scalars[s] for s in (0, 2, 4)] == pytest.approx([logs[s][key] for s in (0, 2, 4)], rel=1e-6, abs=1e-9)
    run = json.loads((out / "sara_run.json").read_text())["monitor"]
    assert run == {"probe": str(probe), "probe_groups": ["p1", "p2", "p3"], "languages": ["es", "sw"],
                   "layers": [1, 2], "baseline": "step0", "monitor_steps": 2, "monitor_max_cost": 1e6,
                   "english_drift_max": None,
                   "stop_on_drift": False, "stopped": None}
    assert (out / "monitor_baseline.safetensors").is_file()


def test_drift_guard_stops_at_first_monitor_step_past_it(tiny_model_dir, example_corpus, tmp_path, capsys, caplog):
    from sara_moe.cli import main

    model_dir = tiny_model_dir("qwen3_moe")
    probe = write_probe(tmp_path / "probe.jsonl", example_corpus, count=4)
    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", str(model_dir), "--data", str(example_corpus), "--output_dir", str(out),
            "--anchor_mode", "online", "--report_to", "none", "--max_steps", "6", "--per_device_train_batch_size", "4",
            "--save_strategy", "no", "--gradient_checkpointing", "false", "--disable_tqdm", "true",
            "--learning_rate", "0.05", "--lr_scheduler_type", "constant", "--probe_data", str(probe),
            "--monitor_steps", "2", "--english_drift_max", "1e-6", "--stop_on_drift", "true"]
    with caplog.at_level(logging.WARNING, logger="sara_moe.train.monitor"):
        assert main(argv) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    logs = monitor_logs(state["log_history"])
    assert state["global_step"] == 2 and sorted(logs) == [0, 2]  # stopped at the first monitor step past 1e-6
    drift = logs[2]["monitor/english_drift"]
    assert drift > 1e-6
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    run = json.loads((out / "sara_run.json").read_text())["monitor"]
    assert run["stopped"]["step"] == 2 and run["stopped"]["english_drift"] == drift
    reason = run["stopped"]["reason"]
    assert "\n" not in reason and reason.startswith("training stopped at step 2: English drift")
    assert reason in capsys.readouterr().out and reason in caplog.text
    # the logged drift, recomputed from output_router_logits of the saved step-2 model and the base model
    model, tokenizer = load_model_and_tokenizer(str(model_dir), "float32")
    english = [g.texts["en"] for g in read_corpus(probe)]
    base = pooled_anchor_routing(model.eval(), tokenizer, english)
    now = pooled_anchor_routing(AutoModelForCausalLM.from_pretrained(out / "checkpoint-2").eval(), tokenizer, english)
    per_layer = js_reference(now, base).mean(0)  # MoE layers 0..3 of the tiny model; aligned 1, 2
    assert logs[2]["monitor/english_drift/layer_1"] == pytest.approx(float(per_layer[1]), rel=1e-4, abs=1e-9)
    assert drift == pytest.approx(float(per_layer[1:3].mean()), rel=1e-4, abs=1e-9)


def test_drift_warning_without_stop_keeps_training(tiny_model_dir, example_corpus, tmp_path, caplog):
    probe = write_probe(tmp_path / "probe.jsonl", example_corpus, count=2)
    cfg = base_config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus, probe_data=str(probe),
                      learning_rate=0.05, english_drift_max=1e-9)
    with caplog.at_level(logging.WARNING, logger="sara_moe.train.monitor"):
        trainer = train(cfg)
    assert trainer.state.global_step == 2
    drift = monitor_logs(trainer)[1]["monitor/english_drift"]
    assert f"step 1: English drift {drift:.6g} > english_drift_max 1e-09" in caplog.text


def test_split_probe_is_held_out_of_training(tiny_model_dir, example_corpus, tmp_path):
    cfg = base_config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus, probe_data="split", probe_groups=4,
                      seed=3)
    trainer, stats = build_trainer(cfg)
    monitor = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RoutingMonitor))
    ids = [g.id for g in read_corpus(example_corpus)]
    expected = [ids[i] for i in sorted(random.Random(3).sample(range(len(ids)), 4))]  # every group has en + others
    assert monitor.probe.ids == expected and monitor.probe.source == "split"
    trained = {name.split(":")[0] for name in trainer.train_dataset["sara_name"]}
    assert trained == set(ids) - set(expected)
    assert stats["held_out"] == 4 and stats["groups"] == 16 and stats["examples"] == 32
    again, _ = build_trainer(base_config(tmp_path / "b", tiny_model_dir("qwen3_moe"), example_corpus,
                                         probe_data="split", probe_groups=4, seed=3))
    assert next(cb for cb in again.callback_handler.callbacks if isinstance(cb, RoutingMonitor)).probe.ids == expected


def test_probe_refusals_are_one_line(tiny_model_dir, example_corpus, tmp_path):
    model_dir = tiny_model_dir("qwen3_moe")
    no_anchor = tmp_path / "no_en.jsonl"
    no_anchor.write_text('{"id": "p1", "en": "A dog.", "sw": "Mbwa."}\n{"id": "p2", "sw": "Paka."}\n')
    untrained = write_probe(tmp_path / "es.jsonl", example_corpus, count=2)
    overlap = write_probe(tmp_path / "overlap.jsonl", example_corpus, count=2, rename=False)
    cases = [
        (dict(probe_data=str(no_anchor)), CorpusError, f"{no_anchor}:2: field 'en' (the anchor language) is missing"),
        (dict(probe_data=str(untrained), train_langs="sw"), CorpusError,
         f"{untrained}:1: field 'es': language not trained by this run"),
        (dict(probe_data=str(overlap)), CorpusError, f"{overlap}:1: group id 's01' is also in the training corpus"),
        (dict(probe_data="split", probe_groups=20), ValueError, "field probe_groups: 20 probe groups would leave no"),
        (dict(probe_data=str(tmp_path / "missing.jsonl")), CorpusError, f"{tmp_path / 'missing.jsonl'}: no such file"),
    ]
    for overrides, error, start in cases:  # a model path that does not exist: refused before any model loads
        with pytest.raises(error) as err:
            build_trainer(base_config(tmp_path, tmp_path / "no_model", example_corpus, **overrides))
        assert str(err.value).startswith(start) and "\n" not in str(err.value), str(err.value)
    config_cases = [(dict(stop_on_drift=True, probe_data="split"), "field stop_on_drift: needs english_drift_max"),
                    (dict(english_drift_max=0.1), "field english_drift_max: the drift is measured on a probe"),
                    (dict(english_drift_max=-1.0, probe_data="split"), "field english_drift_max: must be"),
                    (dict(probe_groups=0), "field probe_groups: must be a positive integer"),
                    (dict(monitor_steps=0), "field monitor_steps: must be a positive integer")]
    for overrides, start in config_cases:
        with pytest.raises(ValueError) as err:
            base_config(tmp_path, model_dir, example_corpus, **overrides)
        assert str(err.value).startswith(start) and "\n" not in str(err.value), str(err.value)


def test_resumed_run_keeps_the_step0_baseline(tiny_model_dir, example_corpus, tmp_path):
    model_dir = tiny_model_dir("qwen3_moe")
    probe = write_probe(tmp_path / "probe.jsonl", example_corpus, count=3)
    first = dict(probe_data=str(probe), learning_rate=0.05, save_strategy="steps", save_steps=2, monitor_steps=1)
    before = monitor_logs(train(base_config(tmp_path, model_dir, example_corpus, **first)))
    out = tmp_path / "run"
    resumed = train(base_config(tmp_path, model_dir, example_corpus, **first, max_steps=3, resume_from_checkpoint=True))
    logs = monitor_logs(resumed)  # the checkpoint's history (steps 0-2), then the resumed run's step 3
    assert sorted(logs) == [0, 1, 2, 3] and all(logs[s] == before[s] for s in (0, 1, 2))
    # its drift is against the base model (recomputed from output_router_logits), not the checkpoint it resumed
    model, tokenizer = load_model_and_tokenizer(str(model_dir), "float32")
    english = [g.texts["en"] for g in read_corpus(probe)]
    base = pooled_anchor_routing(model.eval(), tokenizer, english)
    now = pooled_anchor_routing(AutoModelForCausalLM.from_pretrained(out).eval(), tokenizer, english)
    assert logs[3]["monitor/english_drift"] == pytest.approx(float(js_reference(now, base).mean(0)[1:3].mean()),
                                                             rel=1e-4, abs=1e-9)
    (out / "monitor_baseline.safetensors").unlink()
    with pytest.raises(ValueError) as err:
        train(base_config(tmp_path, model_dir, example_corpus, **first, max_steps=4, resume_from_checkpoint=True))
    assert str(err.value).startswith(f"{out / 'monitor_baseline.safetensors'}: missing") and "\n" not in str(err.value)


def test_two_process_run_logs_the_whole_probe_once(tiny_model_dir, example_corpus, tmp_path):
    """Each rank runs its share of the probe (5 groups: 3 and 2); the sums are added, so the values equal
    `sara analyze` on the whole probe, and one log entry per pass reaches trainer_state.json."""
    import os
    import subprocess
    import sys

    model_dir = tiny_model_dir("qwen3_moe")
    probe = write_probe(tmp_path / "probe.jsonl", example_corpus, count=5)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SARA_TEST_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sara_moe.cli", "train", "--model_name_or_path", str(model_dir), "--data", str(example_corpus),
           "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none",
           "--gradient_checkpointing", "false", "--ddp_backend", "gloo", "--use_cpu", "true", "--anchor_mode",
           "online", "--learning_rate", "0", "--probe_data", str(probe), "--monitor_steps", "1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = monitor_logs(json.loads((out / "trainer_state.json").read_text())["log_history"])
    assert sorted(logs) == [0, 1]
    result = analyze(str(model_dir), probe, tmp_path / "analysis", hidden=False, plots=False, progress=False)
    moe = result["moe_layers"]
    for lang in ("es", "sw"):
        for layer in (1, 2):
            expected = result["metrics"]["js_pair_mean"][lang][moe.index(layer)]
            assert logs[1][f"monitor/js/{lang}/layer_{layer}"] == pytest.approx(expected, abs=1e-6)
    assert abs(logs[1]["monitor/english_drift"]) < 1e-7
