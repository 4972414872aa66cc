"""SARA stage 3: supervised fine-tuning plus routing alignment to English anchors (`sara train`).

    sara train --config configs/sara_tiny.yaml --output_dir runs/sara --max_steps 50
    accelerate launch --config_file configs/accelerate/fsdp2.yaml -m sara_moe.cli train --config run.yaml

    from sara_moe.train import SaraConfig, SaraTrainer
    trainer = SaraTrainer(model, args=SaraConfig(output_dir="runs/x", lambda_js=1.5), train_dataset=dataset,
                          processing_class=tokenizer, priors=load_priors("priors.safetensors"))

`SaraTrainer` is TRL's `SFTTrainer` whose loss is

    loss = CE + router_aux_loss_coef * LB + lambda_js * mean_{examples with an anchor} mean_{l in align_layers}
           D(pooled routing of the target example at l || anchor routing at l)

D is chosen by `divergence`:
- `js` (default): symmetric JS, SARA's loss (Dong et al.; the authors' code clamps at 1e-8);
- `kl`: `KL(anchor || target)` by default (`kl_direction: anchor_target`), Bandarkar et al.'s
  router-alignment loss (`KL(English || target)` in their `contrastive_trainer.py`);
  `kl_direction: target_anchor` gives `KL(target || anchor)`.
Bandarkar et al. do not detach the English side (one forward of both texts, gradients through
both); `anchor_mode: online` with `online_anchor_grad: true` does the same here (the anchor's
forward runs in training mode with gradients). Cached priors and the default online anchor
(`no_grad`, eval mode) are fixed targets, as in SARA.
The target's routing is the masked mean of its router distributions over the `pooling` span
(read by `routing.RouterRecorder`, so gradients reach the routers through any PEFT wrapper
and through non-reentrant gradient checkpointing). The anchor is the cached prior of the
group (`anchor_mode: cached`, from `sara priors`) or the current model's routing of the
anchor text under `no_grad` (`online`). Examples without an anchor (anchor-language examples,
groups lacking the anchor) are left out of the mean, never pulled toward zeros. Under DDP,
FSDP2 or ZeRO-3 the mean is over the global batch (`distributed.global_mean`), so N ranks
give one process's gradient; `load_in_4bit` + `use_peft` is QLoRA (docs/scale.md).
Packing and padding-free batches (`packing: true`, `padding_free: true`) keep every example's routing
its own: each example is a segment of its row (`sara_segment`, built by `SaraCollator` from TRL's
`seq_lengths`, the positions TRL restarts at 0 for attention), pooled over its own tokens, with its own
prior row or anchor text. TRL's packing keeps `input_ids`/`labels` only, so SARA datasets are packed by
`data.train_data.pack_sara_dataset` (TRL's `pack_dataset` plus a per-token example index whose
per-example values the collator looks up). `bfd` is supported; `bfd_split` too while it splits
nothing (an example longer than `max_length` is refused in one line: its pieces would attend only
within themselves and could land in different batches); `wrapped` is refused (it cuts examples and
lets them attend across boundaries). A packed batch's loss and router gradients equal those of the
same examples run one by one unpadded (tests/test_packing.py); the load-balancing loss is a
batch-level statistic and follows TRL's packed batch. Padding-free without packing hands TRL
`max_length: null` during setup (TRL would otherwise refuse it), after checking every example is
already within `max_length`.
The online anchor's forward (no_grad, eval mode) ends right after the deepest aligned router
(`routing.routing_forward`): no layer above the band and no LM head run; the result is
bit-identical to a full forward. Under FSDP/ZeRO-3 (weights gathered by module hooks) and with
`online_anchor_grad` across processes the anchor runs the full forward.
The alignment term keeps per token and aligned layer only the router's logits for backward (the
distribution is recomputed in backward, `routing.SegmentMeanOfProbabilities`), see docs/scale.md.
`lambda_js: 0` returns SFTTrainer's loss untouched (the baseline arm); the JS to cached priors
is still logged. Metrics `ce_loss`, `aux_loss` and the alignment term under its divergence's name
(`js_loss` or `kl_loss`, `ALIGN_METRIC`) go to `log_history` every logging step (default 1). A non-finite loss stops training with the step and example ids; the last
checkpoint stays intact. The load-balancing loss keeps the model's own coefficient unless
`router_aux_loss_coef` is set; the alignment term never depends on `output_router_logits`.
Routing monitor: with `probe_data` (a held-out parallel file, or `split`: `probe_groups` groups of the
corpus held out of training, drawn by `seed`; `train.probe`, checked before the model loads)
`build_trainer` adds a `train.monitor.RoutingMonitor`. Every `monitor_steps` (default: `eval_steps` when
evaluating by steps, else `logging_steps`) it logs `monitor/js/<lang>[/layer_<L>]` (the probe's routing
JS to English, as `sara analyze` computes it), `monitor/english_drift[/layer_<L>]` (JS of the current
English routing to the base model's: the cached priors, or a pass at step 0),
`monitor/load_entropy/layer_<L>`, `monitor/dead_experts/layer_<L>` and `monitor/seconds` through
`Trainer.log` (log_history and every `report_to` backend). `english_drift_max` warns past a drift;
with `stop_on_drift` the run stops at that step with a checkpoint and `sara train` prints why;
`sara_run.json` records the monitor under "monitor".
"""

from __future__ import annotations

from pathlib import Path

import torch
from trl import SFTTrainer

from sara_moe import divergence as D
from sara_moe.architectures import (
    expose_num_experts,
    lora_targets,
    mark_zero3_leaf_modules,
    resolve_layer_spec,
    set_router_site,
    text_config,
)
from sara_moe.data.train_data import SaraCollator, check_packing, check_truncated, pack_sara_dataset
from sara_moe.priors import PriorCache, PriorsError
from sara_moe.routing import RouterRecorder, routing_forward, segment_token_counts, span_mask
from sara_moe.runtime import artifacts, distributed

from sara_moe.train.config import SaraConfig

ALIGN_METRIC = {"js": "js_loss", "kl": "kl_loss"}  # logged name of the alignment term per divergence


class TrainingDivergedError(ValueError):
    """The loss became NaN/inf; the message names the step and the batch's example ids."""


def lora_config(model, preset: str = "all", r: int = 16, alpha: int = 32, dropout: float = 0.0):
    """peft LoraConfig reaching attention projections, fused experts and/or routers of any family
    (`architectures.lora_targets` names them)."""
    from peft import LoraConfig

    targets = lora_targets(model)
    modules = targets["attention"] if preset in ("all", "attention") else []
    params = (targets["experts"] if preset in ("all", "experts") else []) + \
        (targets["routers"] if preset in ("all", "routers") else [])
    if params and dropout:
        raise ValueError("field lora_dropout: must be 0 when LoRA reaches experts or routers (peft ParamWrapper)")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules or None,
                      target_parameters=params or None, task_type="CAUSAL_LM", bias="none")


class SaraTrainer(SFTTrainer):
    """SFTTrainer + lambda_js * routing divergence to anchors; see the module docstring."""

    def __init__(self, model, args: SaraConfig, train_dataset=None, priors: PriorCache | None = None, **kwargs):
        if args.router_site is not None:  # before the priors check: the fingerprint names the site
            set_router_site(model, args.router_site)
        if priors is not None:  # every path (CLI or Python) checks the cache against this model and data
            _check_priors(priors, model, kwargs.get("processing_class"), args, train_dataset)
        if args.router_aux_loss_coef is None:  # keep the model's coefficient, whatever TRL's default would do
            args.router_aux_loss_coef = float(getattr(text_config(model), "router_aux_loss_coef", None) or 0.0)
        expose_num_experts(model)
        # every check of the config against the model comes before SFTTrainer.__init__, which creates output_dir
        self.align_layers = resolve_layer_spec(model, args.align_layers, args.analysis, "field align_layers")
        self.prior_table = None
        if priors is not None:
            missing = [layer for layer in self.align_layers if layer not in priors.layers]
            if missing:
                raise ValueError(f"{priors.path}: prior cache has no layers {missing}; it holds {priors.layers}")
            cols = [priors.layers.index(layer) for layer in self.align_layers]
            self.prior_table = priors.table[:, cols, :].contiguous()
        if args.anchor_mode == "cached" and self.prior_table is None and args.lambda_js > 0:
            raise ValueError("field priors: anchor_mode 'cached' needs a priors file from `sara priors`")
        if args.lambda_js > 0 and args.gradient_checkpointing and \
                (args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError("reentrant gradient checkpointing cuts the router logits from the graph; "
                             "set gradient_checkpointing_kwargs {use_reentrant: false} (PEFT+ZeRO-3 forces it on)")
        self._sara_catalog: list[dict] = []  # per-example sara_* values of packed datasets (pack_sara_dataset)
        max_length = args.max_length
        if args.padding_free and not args.packing and max_length is not None:
            # TRL refuses padding-free without packing unless max_length is None, as it would not truncate;
            # SARA's datasets are truncated already (build_train_dataset), which is checked here
            for dataset in (train_dataset, kwargs.get("eval_dataset")):
                check_truncated(dataset, max_length)
            args.max_length = None
        try:
            super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        finally:
            args.max_length = max_length
        self.data_collator = SaraCollator(self.data_collator, self._tokenizer, self._sara_catalog)
        if self.is_deepspeed_enabled and getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3:
            mark_zero3_leaf_modules(self.model)  # else ZeRO-3 hangs when an expert gets no tokens
        self._recorder = None
        self._captured = None
        self.model.register_forward_hook(self._capture_outputs)

    @property
    def online_anchor(self) -> bool:
        """Anchors come from the model itself this step (anchor_mode online, with an alignment term);
        otherwise from the prior cache, which is also what lambda_js 0 logs the divergence to."""
        return self.args.anchor_mode == "online" and self.args.lambda_js > 0

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """HF save, with the training arguments as JSON instead of Trainer's pickled training_args.bin."""
        super().save_model(output_dir, _internal_call)
        folder = Path(output_dir or self.args.output_dir)
        pickled = folder / "training_args.bin"
        if self.is_world_process_zero() and pickled.exists():
            artifacts.write_text(folder / "training_args.json", self.args.to_json_string())
            pickled.unlink()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume full weights through `from_pretrained`, which converts the saved per-expert
        tensors back into transformers 5's fused expert parameters; Trainer's plain
        `load_state_dict` drops them as "unexpected keys" and would resume with stale experts."""
        target = self.accelerator.unwrap_model(model or self.model)
        plain = not (self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(target, "peft_config"))
        if not plain or not (Path(resume_from_checkpoint) / "config.json").is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        target.load_state_dict(saved.state_dict(), strict=True)

    def _capture_outputs(self, _module, _inputs, output):
        in_backward = torch._C._current_graph_task_id() != -1  # checkpoint recompute: not the real forward
        if self._captured is not None and not in_backward:
            self._captured["outputs"] = output

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation; SARA datasets are packed here instead, keeping each example's identity
        (`data.train_data.pack_sara_dataset`): TRL's packing keeps `input_ids`/`labels` only."""
        columns = getattr(dataset, "column_names", None) or []
        if not (packing and "sara_has_anchor" in columns):
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if args.max_length is None:
            raise ValueError("field max_length: packing needs a row length; set max_length")
        check_packing(dataset, args.max_length, args.packing_strategy)  # before TRL's truncation hides a split
        dataset = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        return pack_sara_dataset(dataset, args.max_length, args.packing_strategy, self._sara_catalog,
                                 {"num_proc": args.dataset_num_proc}, args.seed if args.shuffle_dataset else None)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = ["sara_prior_row", "sara_has_anchor", "sara_name", "sara_anchor_ids", "sara_anchor_prompt_len",
                 "sara_example"]
        self._signature_columns = list(self._signature_columns) + [c for c in extra if c not in self._signature_columns]

    def _online_anchor(self, model, sara: dict, rows: torch.Tensor) -> torch.Tensor:
        """The current model's anchor routing `[len(rows), layers, E]`: fixed (no_grad, eval mode, the forward
        ended after the deepest aligned router) or, with online_anchor_grad, a training-mode forward whose
        routing the loss differentiates too."""
        ids, mask = sara["sara_anchor_input_ids"][rows], sara["sara_anchor_attention_mask"][rows]
        width = int(mask.sum(-1).max())
        ids, mask = ids[:, :width], mask[:, :width]
        grad = self.args.online_anchor_grad and model.training
        # sharded weights are gathered and released by module hooks that a forward ended early would skip
        early_exit = not (self.is_fsdp_enabled or self.is_deepspeed_enabled) and (not grad or self.args.world_size == 1)
        was_training = model.training
        if not grad:
            model.eval()
        try:
            with torch.set_grad_enabled(grad):
                routing_forward(model, self._recorder, ids, mask, early_exit=early_exit)
                pool = span_mask(mask, sara["sara_anchor_prompt_len"][rows], self.args.pooling)
                segments = torch.where(pool, torch.arange(len(rows), device=pool.device).unsqueeze(-1), -1)
                anchor = self._recorder.pooled_by_segment(segments, len(rows))
        finally:
            model.train(was_training)
            self._recorder.clear()
        return anchor

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sara = {k: inputs.pop(k) for k in list(inputs) if k.startswith("sara_")}
        mode = "train" if self.model.training else "eval"
        online = self.online_anchor
        measure = "sara_has_anchor" in sara and (self.prior_table is not None or online)
        if self._recorder is None and measure:
            self._recorder = RouterRecorder(self.model, self.align_layers)
        has_anchor = sara.get("sara_has_anchor")
        anchor = None
        if online and has_anchor is not None and bool(has_anchor.any()):
            anchor = self._online_anchor(model, sara, has_anchor.nonzero().squeeze(-1))
        self._captured = {}
        try:
            if measure:
                with self._recorder:
                    loss = super().compute_loss(model, inputs, return_outputs=False,
                                                num_items_in_batch=num_items_in_batch)
            else:
                loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
            outputs = self._captured.get("outputs")
        finally:
            self._captured = None
        align = torch.zeros((), device=loss.device)  # JS or KL, by `divergence`
        if measure:
            try:
                align = self._alignment_term(sara, anchor, has_anchor)
            finally:
                self._recorder.clear()  # the pooled term holds what backward needs
            if self.args.lambda_js > 0:
                steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                loss = loss + self.args.lambda_js * align / steps
        self._log_parts(mode, outputs, align)
        if not torch.isfinite(loss.detach()).all():
            step = self.state.global_step + 1
            names = ", ".join(sara.get("sara_name") or ["?"])
            raise TrainingDivergedError(f"step {step}: loss is {loss.item()} on batch [{names}]; training stopped, "
                                     f"last checkpoint kept in {self.args.output_dir} (lower learning_rate/lambda_js)")
        if return_outputs:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

    def _alignment_term(self, sara, anchor, has_anchor) -> torch.Tensor:
        """Mean over the batch's examples with an anchor of D(pooled routing || anchor), averaged over layers.
        Examples are the segments of `sara_segment` (rows of a padded batch, or examples packed in a row)."""
        segment, response = sara["sara_segment"], sara["sara_response"]
        keep = {"all": segment >= 0, "response": response & (segment >= 0),
                "prompt": ~response & (segment >= 0)}[self.args.pooling]
        pool = torch.where(keep, segment, -1)
        pooled = self._recorder.pooled_by_segment(pool, len(has_anchor))  # [N, L, E]
        valid = has_anchor.to(pooled.device) & (segment_token_counts(pool, len(has_anchor)).to(pooled.device) > 0)
        if self.online_anchor:
            target = torch.zeros_like(pooled)
            if anchor is not None:
                target[has_anchor.nonzero().squeeze(-1)] = anchor.to(pooled.dtype)
        else:
            table = self.prior_table = self.prior_table.to(pooled.device)
            target = table[sara["sara_prior_row"].to(pooled.device).clamp_min(0)]
        if self.args.divergence == "kl" and self.args.kl_direction == "anchor_target":
            per_example = D.kl_divergence(target, pooled).mean(-1)  # [N]: KL(anchor || target)
        else:
            per_example = D.divergence(self.args.divergence, pooled, target).mean(-1)
        # mean over the valid examples of the global batch, also when ranks hold unequal numbers of them
        return distributed.global_mean(per_example, valid.to(per_example.dtype))

    def _log_parts(self, mode: str, outputs, align: torch.Tensor) -> None:
        gather = self.accelerator.gather_for_metrics
        log_probs = getattr(outputs, "log_probs", None)
        if log_probs is not None:
            count = outputs.label_mask.sum().clamp_min(1)
            ce = (-log_probs.detach().sum() / count).float()
            self._metrics[mode]["ce_loss"].append(gather(ce).mean().item())
        self._metrics[mode][ALIGN_METRIC[self.args.divergence]].append(gather(align.detach().float()).mean().item())
        if not self.aux_loss_enabled:
            self._metrics[mode]["aux_loss"].append(0.0)


def _check_priors(priors: PriorCache, model, tokenizer, args: SaraConfig, dataset) -> None:
    """Model fingerprint, expert count and, when the dataset carries them, the anchor texts' hashes."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
    priors.check(model, tokenizer, args.pooling, args.anchor)
    columns = getattr(dataset, "column_names", None) or []
    if priors.text_sha is None or not {"sara_anchor_sha", "sara_prior_row", "sara_name"} <= set(columns):
        return
    for row, digest, name in zip(dataset["sara_prior_row"], dataset["sara_anchor_sha"], dataset["sara_name"]):
        if row >= len(priors.ids):
            raise PriorsError(f"{priors.path}: example {name} points at row {row} of {len(priors.ids)}; "
                              "rebuild the dataset with this priors file")
        if row >= 0 and priors.text_sha[row] != digest:
            priors.check_texts({priors.ids[row]: digest}, {priors.ids[row]: f"example {name}"})
