"""The training room (`sara train`, floor 3, core): SARA's fine-tuning and what watches it.

    from sara_moe.train import SaraConfig, SaraTrainer, build_trainer, train, RoutingMonitor

`config`: `SaraConfig` (TRL's `SFTConfig` + the SARA fields); `trainer`: `SaraTrainer` (SFTTrainer +
lambda * routing divergence to the anchors), `lora_config`; `run`: `build_trainer`, `train`, `train_cli`
(`sara train` end to end: checks, model, data, probe, trainer, records); `probe`: the
routing monitor's held-out probe set (a file, or groups split off the corpus); `monitor`:
`RoutingMonitor`, the callback logging probe JS per language, English drift and expert load,
with the drift guard. Imports the core below it only (divergence, runtime, data, architectures,
routing, priors), never analysis, evaluation, steering, reporting, testbed or experiment.
"""

from sara_moe.train.config import LORA_PRESETS, SaraConfig
from sara_moe.train.monitor import RoutingMonitor
from sara_moe.train.probe import Probe, prepare_probe, read_probe
from sara_moe.train.run import build_model_for_training, build_trainer, routing_monitor, train, train_cli
from sara_moe.train.trainer import ALIGN_METRIC, SaraTrainer, TrainingDivergedError, lora_config

__all__ = ["ALIGN_METRIC", "LORA_PRESETS", "Probe", "RoutingMonitor", "SaraConfig", "SaraTrainer",
           "TrainingDivergedError", "build_model_for_training", "build_trainer", "lora_config", "prepare_probe",
           "read_probe", "routing_monitor", "train", "train_cli"]
