"""Routing monitor: the probe set's routing every `monitor_steps` of training, logged by the Trainer itself.

    sara train --config run.yaml --probe_data split --english_drift_max 0.05 --stop_on_drift true

    from sara_moe.train import RoutingMonitor
    trainer.add_callback(RoutingMonitor(trainer, "probe.jsonl"))      # any SaraTrainer
    monitor.describe()   # what sara_run.json records under "monitor"

A `transformers.TrainerCallback`. Every `monitor_steps` optimizer steps (none: at the cadence of
`eval_steps` when the run evaluates by steps, else `logging_steps`, but only where the pass fits the
cost budget: the monitor's wall time so far, with one more pass as long as the last, stays within
`monitor_max_cost` (default 5%) of the training wall time so far; a probe pass costs about as much as
a few training steps, and SaraConfig logs every step) it runs every probe text once in eval mode under
`no_grad` (train mode is restored after) and logs through `Trainer.log`, so the values land in
`trainer_state.json`'s `log_history` (with their `step`) and in every `report_to` backend:

- `monitor/js/<lang>` and `monitor/js/<lang>/layer_<L>`: per aligned layer L (true decoder index)
  the mean over the probe's parallel pairs of JS(anchor routing, <lang> routing), and its mean
  over the layers: `sara analyze`'s `js_pair_mean` on the same text (one implementation: the
  pooling of `routing.pool_sequences`, dense probabilities over every real token, and
  `divergence.js_exact`);
- `monitor/english_drift` (and `/layer_<L>`): the mean over the probe's anchors of JS(current
  anchor routing, the base model's). The base is the run's cached priors when they hold every
  probe anchor (same text, `pooling: all`), else the model's own pass at step 0, before any
  update, saved as `monitor_baseline.safetensors` in output_dir so a resumed run keeps it;
- `monitor/load_entropy/layer_<L>`: entropy (nats) of the share of dispatched slots per expert
  over the probe's real tokens, all languages; `monitor/dead_experts/layer_<L>`: the share of
  experts that got none of them; `monitor/seconds`: the wall time of the pass.

Under a launcher each rank runs its share of the probe (groups r, r + W, ...) and the sums are
added over ranks (`distributed.all_sum`), so every rank logs the same values and the backends
write them once (rank 0); with sharded weights (FSDP, ZeRO-3) every rank runs the whole probe,
since a gathered forward needs every rank. The drift guard: past `english_drift_max` a warning
names the step and the value; with `stop_on_drift` training stops at that step with a checkpoint
saved, and `stopped` holds the line saying why.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from sara_moe import divergence as D
from sara_moe.architectures import router_weight
from sara_moe.data.corpus import encode
from sara_moe.routing import RouterRecorder, pool_sequences
from sara_moe.runtime import artifacts, distributed
from sara_moe.train.probe import Probe, read_probe

logger = logging.getLogger(__name__)
BASELINE_FILE = "monitor_baseline.safetensors"


class RoutingMonitor(TrainerCallback):
    """Probe routing, English drift, expert load during training; see the module docstring."""

    def __init__(self, trainer, probe: Probe | str, *, priors=None, monitor_steps: int | None = None,
                 english_drift_max: float | None = None, stop_on_drift: bool | None = None):
        args = trainer.args
        anchor = getattr(args, "anchor", "en")
        self.trainer = trainer
        self.probe = read_probe(probe, anchor) if not isinstance(probe, Probe) else probe
        self.layers = list(trainer.align_layers)
        self.langs = list(self.probe.langs)
        self.monitor_steps = monitor_steps if monitor_steps is not None else getattr(args, "monitor_steps", None)
        self.english_drift_max = (english_drift_max if english_drift_max is not None
                                  else getattr(args, "english_drift_max", None))
        self.stop_on_drift = bool(stop_on_drift if stop_on_drift is not None else getattr(args, "stop_on_drift", False))
        if self.stop_on_drift and self.english_drift_max is None:
            raise ValueError("field stop_on_drift: needs english_drift_max (the drift at which to stop)")
        self.baseline = _priors_baseline(priors, self.probe, self.layers)  # [G, L, E] or None
        self.baseline_source = "priors" if self.baseline is not None else "step0"
        self.every = self.monitor_steps
        # the cost budget applies to the default cadence only: an explicit monitor_steps is obeyed
        self.max_cost = float(getattr(args, "monitor_max_cost", 0.05)) if self.monitor_steps is None else None
        self._began = None  # wall clock at train begin
        self._spent = self._last = 0.0  # seconds of every monitor pass so far, and of the last one
        self.stopped: dict | None = None
        self._encoded = None
        self._recorder = None

    def describe(self) -> dict:
        """The run record of the monitor (`sara_run.json` "monitor")."""
        return {"probe": self.probe.source, "probe_groups": self.probe.ids, "languages": self.langs,
                "layers": self.layers, "baseline": self.baseline_source, "monitor_steps": self.every,
                "monitor_max_cost": self.max_cost,
                "english_drift_max": self.english_drift_max, "stop_on_drift": self.stop_on_drift,
                "stopped": self.stopped}

    # ------------------------------------------------------------------ callback events
    def on_train_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()
        self._spent = self._last = 0.0  # the budget counts this train() call
        if self.every is None:
            by_steps = str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "steps" and state.eval_steps
            self.every = max(1, int(state.eval_steps if by_steps else state.logging_steps))
        if self.baseline is not None:
            return control
        path = Path(args.output_dir) / BASELINE_FILE
        if state.global_step > 0:  # resumed: the base model's pass was made at step 0 of this run
            self.baseline = _load_baseline(path, self.probe.ids, self.layers)
            return control
        sums, seconds = self._pass()
        self._spent, self._last = self._spent + seconds, seconds
        self.baseline = sums["anchors"]
        artifacts.save_safetensors(path, {"baseline": self.baseline.float()},
                                   {"ids": json.dumps(self.probe.ids), "layers": json.dumps(self.layers)})
        self._log(self._metrics(sums, seconds))
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.every is None or state.global_step % self.every or not self._fits_budget():
            return control
        sums, seconds = self._pass()
        self._spent, self._last = self._spent + seconds, seconds
        logs = self._metrics(sums, seconds)
        self._log(logs)
        drift = logs["monitor/english_drift"]
        if self.english_drift_max is not None and drift > self.english_drift_max:
            line = f"step {state.global_step}: English drift {drift:.6g} > english_drift_max {self.english_drift_max:g}"
            if self.stop_on_drift:
                control.should_training_stop = True
                control.should_save = True  # Trainer saves checkpoint-<step> before leaving the loop
                reason = (f"training stopped at {line} (stop_on_drift); checkpoint saved in "
                          f"{Path(args.output_dir) / f'checkpoint-{state.global_step}'}")
                self.stopped = {"step": state.global_step, "english_drift": drift,
                                "english_drift_max": self.english_drift_max, "reason": reason}
                logger.warning(reason)
            else:
                logger.warning(f"{line}: English routing moves away from the base model's")
        return control

    def _fits_budget(self) -> bool:
        """Whether one more pass keeps the monitor within `max_cost` of the training time so far; decided on
        the main process and shared, so every rank runs the pass (its sums are collective) or none does."""
        if self.max_cost is None:
            return True
        training = time.perf_counter() - self._began - self._spent
        fits = self._spent + self._last <= self.max_cost * training
        if distributed.world_size() > 1:
            fits = bool(distributed.from_main(torch.tensor(int(fits))))
        return fits

    # ------------------------------------------------------------------ the probe pass
    def _log(self, logs: dict) -> None:
        # Trainer.log, not TRL's override: that one folds and clears the training batches' metrics buffer
        control = self.trainer.control
        should_log = control.should_log  # on_log clears it, which would drop this step's regular log
        Trainer.log(self.trainer, logs)
        self.trainer.control.should_log = should_log

    def _prepare(self, model) -> None:
        tokenizer = getattr(self.trainer.processing_class, "tokenizer", self.trainer.processing_class)
        max_length = getattr(self.trainer.args, "max_length", None)
        langs = [self.probe.anchor, *self.langs]
        self._encoded = [{lang: encode(g.texts[lang], tokenizer, max_length)[0] for lang in langs if lang in g.texts}
                         for g in self.probe.groups]
        self._tokenizer = tokenizer
        self._recorder = RouterRecorder(model, self.layers, keep_topk=True)
        self._num_experts = int(router_weight(self._recorder.sites[0]).shape[0])

    def _pass(self) -> tuple[dict, float]:
        """Sums over the probe (this rank's share, then added over ranks) and the pass's wall time."""
        start = time.perf_counter()
        trainer, model = self.trainer, self.trainer.model
        if self._encoded is None:
            self._prepare(model)
        sharded = bool(getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False))
        world, me = distributed.world_size(), distributed.rank()
        share = world > 1 and not sharded
        mine = list(range(me, len(self._encoded), world)) if share else list(range(len(self._encoded)))
        mine.sort(key=lambda i: len(self._encoded[i][self.probe.anchor]))  # length-sorted batches pad less
        was_training = model.training
        model.eval()
        try:
            sums = self._sums(model, mine, trainer.args.per_device_eval_batch_size, early_exit=not sharded)
        finally:
            model.train(was_training)
        if share:
            sizes = {name: value.shape for name, value in sums.items()}
            flat = distributed.all_sum(torch.cat([value.reshape(-1) for value in sums.values()]))
            sums = {name: piece.reshape(sizes[name]) for name, piece in
                    zip(sizes, flat.cpu().split([v.numel() for v in sums.values()]))}
        return sums, time.perf_counter() - start

    @torch.no_grad()
    def _sums(self, model, rows: list[int], batch_size: int, early_exit: bool) -> dict:
        L, n = len(self.layers), len(self.langs)
        anchor = self.probe.anchor
        sums = {"js": torch.zeros(n, L, dtype=torch.float64), "pairs": torch.zeros(n, dtype=torch.float64),
                "anchors": None, "counts": None}
        for start in range(0, len(rows), max(1, batch_size)):
            batch = rows[start:start + batch_size]
            base = self._pool(model, [self._encoded[i][anchor] for i in batch], early_exit)
            if sums["anchors"] is None:
                num_experts = base.pooled.shape[-1]
                sums["anchors"] = torch.zeros(len(self._encoded), L, num_experts, dtype=torch.float64)
                sums["counts"] = torch.zeros(L, num_experts, dtype=torch.float64)
            sums["anchors"][batch] = base.pooled.double()
            sums["counts"] += base.counts.double()
            for li, lang in enumerate(self.langs):
                have = [r for r, i in enumerate(batch) if lang in self._encoded[i]]
                if not have:
                    continue
                out = self._pool(model, [self._encoded[batch[r]][lang] for r in have], early_exit)
                sums["js"][li] += D.js_exact(base.pooled[have], out.pooled).double().sum(0)
                sums["pairs"][li] += len(have)
                sums["counts"] += out.counts.double()
        if sums["anchors"] is None:  # a rank without probe groups adds zeros of the right shape
            sums["anchors"] = torch.zeros(len(self._encoded), L, self._num_experts, dtype=torch.float64)
            sums["counts"] = torch.zeros(L, self._num_experts, dtype=torch.float64)
        return sums

    def _pool(self, model, sequences, early_exit: bool):
        return pool_sequences(model, self._recorder, sequences, self._tokenizer, "dense",
                              early_exit=early_exit)

    def _metrics(self, sums: dict, seconds: float) -> dict:
        logs = {}
        for li, lang in enumerate(self.langs):
            pairs = float(sums["pairs"][li])
            if pairs == 0:
                continue
            per_layer = sums["js"][li] / pairs
            logs[f"monitor/js/{lang}"] = float(per_layer.mean())
            logs.update({f"monitor/js/{lang}/layer_{layer}": float(v) for layer, v in zip(self.layers, per_layer)})
        drift = D.js_exact(sums["anchors"], self.baseline.to(sums["anchors"].dtype)).double().mean(0)  # [L]
        logs["monitor/english_drift"] = float(drift.mean())
        logs.update({f"monitor/english_drift/layer_{layer}": float(v) for layer, v in zip(self.layers, drift)})
        counts = sums["counts"]
        entropy = D.entropy(counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)).double()
        dead = (counts == 0).double().mean(-1)
        for layer, h, d in zip(self.layers, entropy, dead):
            logs[f"monitor/load_entropy/layer_{layer}"] = float(h)
            logs[f"monitor/dead_experts/layer_{layer}"] = float(d)
        logs["monitor/seconds"] = seconds
        return logs


def _priors_baseline(priors, probe: Probe, layers: list[int]) -> torch.Tensor | None:
    """The priors' rows of the probe's anchors `[G, L, E]` when they hold all of them, same text, pooled
    over every token like the monitor; else None (the step-0 pass is the base)."""
    from sara_moe.runtime.artifacts import text_sha

    if priors is None or (priors.fingerprint or {}).get("pooling", "all") != "all":
        return None
    rows = priors.row_of()
    if any(gid not in rows for gid in probe.ids) or any(layer not in priors.layers for layer in layers):
        return None
    if priors.text_sha is not None and any(priors.text_sha[rows[g.id]] != text_sha(g.texts[probe.anchor])
                                           for g in probe.groups):
        return None
    cols = [priors.layers.index(layer) for layer in layers]
    return priors.table[[rows[gid] for gid in probe.ids]][:, cols, :].double()


def _load_baseline(path: Path, ids: list, layers: list) -> torch.Tensor:
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"{path}: missing; a resumed run's English drift needs the step-0 routing saved there "
                         "(restart from step 0, or give priors covering the probe's anchors)")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        table = fh.get_tensor("baseline")
    if json.loads(meta.get("ids", "[]")) != ids or json.loads(meta.get("layers", "[]")) != layers:
        raise ValueError(f"{path}: made for other probe groups or layers than this run's; restart from step 0 "
                         "with this probe, or give the original probe_data")
    return table.double()
