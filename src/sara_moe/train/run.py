"""`sara train` end to end: model, data, probe and trainer from a `SaraConfig`, then training and its records.

    sara train --config configs/sara_tiny.yaml --output_dir runs/sara --max_steps 50

    from sara_moe.train import SaraConfig, build_trainer, train
    trainer, stats = build_trainer(cfg)   # checked model, priors, dataset (+ RoutingMonitor with probe_data)
    trainer = train(cfg)                  # ... trained, saved, sara_config.json and sara_run.json written

What the trainer computes is `train.trainer`'s docstring (also `sara train --help`'s description).
"""

from __future__ import annotations

from pathlib import Path

from sara_moe.architectures import find_routers, scoring_verdict, set_router_site
from sara_moe.data.train_data import build_train_dataset
from sara_moe.priors import load_priors
from sara_moe.runtime import artifacts
from sara_moe.runtime.checkpoints import prepare_output_dir
from sara_moe.runtime.loading import four_bit_kwargs, load_model_and_tokenizer
from sara_moe.runtime.options import parse_config
from sara_moe.train import trainer as trainer_module
from sara_moe.train.config import SaraConfig
from sara_moe.train.monitor import RoutingMonitor
from sara_moe.train.probe import prepare_probe
from sara_moe.train.trainer import ALIGN_METRIC, SaraTrainer, lora_config


def build_model_for_training(cfg: SaraConfig):
    quantized = four_bit_kwargs(cfg.model_dtype) if cfg.load_in_4bit else None
    model, tokenizer = load_model_and_tokenizer(cfg.model_name_or_path, cfg.model_dtype,
                                                trust_remote_code=cfg.trust_remote_code, from_pretrained_kwargs=quantized)
    set_router_site(model, cfg.router_site)
    if cfg.routers_only and not cfg.use_peft:
        routers = [s.name for s in find_routers(model)]
        for name, param in model.named_parameters():  # a router's own parameters, however deep (JetMoE: .layer)
            param.requires_grad_(any(name.startswith(router + ".") for router in routers))
    peft_config = None
    if cfg.use_peft:
        preset = "routers" if cfg.routers_only else cfg.lora_preset
        peft_config = lora_config(model, preset, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    return model, tokenizer, peft_config


def build_trainer(cfg: SaraConfig) -> tuple[SaraTrainer, dict]:
    """Model, tokenizer, checked priors and dataset per `cfg`, wrapped in a SaraTrainer (+ data counts);
    with `probe_data` the probe is checked first (before the model loads) and a `RoutingMonitor` added."""
    for name in ("model_name_or_path", "data"):
        if not getattr(cfg, name):
            raise ValueError(f"field {name}: required (YAML key or --{name})")
    probe = prepare_probe(cfg) if cfg.probe_data is not None else None
    model, tokenizer, peft_config = build_model_for_training(cfg)
    priors = None
    if cfg.anchor_mode == "cached" and (cfg.lambda_js > 0 or cfg.priors):
        if not cfg.priors:
            raise ValueError("field priors: anchor_mode 'cached' needs --priors PRIORS.safetensors (from `sara priors`)")
        priors = load_priors(cfg.priors)  # checked against the model and data by SaraTrainer
    dataset, stats = build_train_dataset(
        cfg.data, tokenizer, cfg.anchor, cfg.train_langs, cfg.train_anchor, cfg.max_length,
        prior_rows=priors.row_of() if priors is not None else None,
        anchor_mode=cfg.anchor_mode, allow_missing_anchor=cfg.allow_missing_anchor,
        exclude_ids=probe.held_out if probe is not None else None)
    trainer = SaraTrainer(model, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config, priors=priors)
    if probe is not None:
        trainer.add_callback(RoutingMonitor(trainer, probe, priors=priors))
    return trainer, stats


def routing_monitor(trainer) -> RoutingMonitor | None:
    """The trainer's `RoutingMonitor` callback, if it has one."""
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RoutingMonitor)]
    return found[0] if found else None


def train(cfg: SaraConfig) -> SaraTrainer:
    """Train per `cfg` and save model, tokenizer, trainer_state.json, sara_config.json (the resolved
    `SaraConfig`, a valid `--config`) and sara_run.json (resolved layers, world size, data counts,
    scoring rule, run metadata; with a probe, the monitor's record, written again after training
    with its cadence and, if the drift guard stopped the run, why) to output_dir.

    The output_dir rules (refuse a non-empty one, `overwrite_output_dir`, resume from the last
    complete checkpoint) are `checkpoints.prepare_output_dir`'s, applied before the model loads.
    """
    resume = prepare_output_dir(cfg.output_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir)
    trainer, stats = build_trainer(cfg)
    monitor = routing_monitor(trainer)
    run = {}
    if trainer.is_world_process_zero():
        config = artifacts.config_dict(cfg)
        artifacts.write_json(Path(cfg.output_dir) / "sara_config.json", config)
        run = {"align_layers_resolved": trainer.align_layers, "router_site": find_routers(trainer.model)[0].site,
               "world_size": trainer.args.world_size, "data_stats": stats,
               "scoring": scoring_verdict(trainer.model).as_dict(),
               "metadata": artifacts.run_metadata(config, cfg.seed, trainer.args.device),
               **({"monitor": monitor.describe()} if monitor is not None else {})}
        artifacts.write_json(Path(cfg.output_dir) / "sara_run.json", run)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(cfg.output_dir)
    trainer.save_state()
    if monitor is not None and trainer.is_world_process_zero():
        artifacts.write_json(Path(cfg.output_dir) / "sara_run.json", {**run, "monitor": monitor.describe()})
    return trainer


def train_cli(argv=None) -> int:
    cfg = parse_config(SaraConfig, argv, "sara train", trainer_module.__doc__.split("\n\n")[0])
    trainer = train(cfg)
    last = [h for h in trainer.state.log_history if ALIGN_METRIC[cfg.divergence] in h][-1:]
    monitor = routing_monitor(trainer)
    if monitor is not None and monitor.stopped:
        print(monitor.stopped["reason"])
    print(f"trained {trainer.state.global_step} steps; last log {last}; model saved to {cfg.output_dir}")
    return 0
