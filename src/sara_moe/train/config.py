"""`SaraConfig`: the options of `sara train` (TRL's `SFTConfig` plus the SARA fields).

    from sara_moe.train import SaraConfig
    cfg = SaraConfig(output_dir="runs/x", model_name_or_path="runs/tiny", data="corpus.jsonl",
                     priors="priors.safetensors", lambda_js=1.5, probe_data="split", english_drift_max=0.05)

Every field is a YAML key and a `--flag` of `sara train` (`runtime.options.parse_config`); the checks of a
field on its own (ranges, choices, fields that need another) run here, in one line naming the field; the
checks against the model and the data run in `SaraTrainer` and `train.probe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from trl import SFTConfig

from sara_moe.architectures import LAYER_SPEC_HELP, layer_spec_items
from sara_moe.data.train_data import ANCHOR_MODES, parse_langs

LORA_PRESETS = ("all", "attention", "experts", "routers")


@dataclass
class SaraConfig(SFTConfig):
    """SFTConfig plus the SARA fields; YAML keys and `--flags` of `sara train` are these names."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "starting model (save_pretrained dir)"})
    data: str | None = field(default=None, metadata={"help": "parallel instruction corpus (JSONL)"})
    anchor: str = field(default="en", metadata={"help": "anchor language key"})
    train_langs: str | None = field(default=None, metadata={"help": "comma list, e.g. sw,yo (default: all but anchor)"})
    train_anchor: bool = field(default=False, metadata={"help": "also train on the anchor-language examples"})
    allow_missing_anchor: bool = field(default=False, metadata={"help": "train groups lacking the anchor, without JS"})
    lambda_js: float = field(default=1.5, metadata={"help": "weight of the routing alignment term (0 = plain SFT)"})
    align_layers: list[str] = field(default_factory=lambda: ["auto"], metadata={"help": LAYER_SPEC_HELP})
    analysis: str | None = field(default=None, metadata={"help": "analysis.json whose recommended_layers 'auto' uses"})
    anchor_mode: str = field(default="cached", metadata={"help": "cached (priors file) | online"})
    priors: str | None = field(default=None, metadata={"help": "priors file from `sara priors` (cached mode)"})
    divergence: str = field(default="js", metadata={
        "help": "js (SARA, Dong et al.) | kl (Bandarkar et al.: KL(anchor || target), see kl_direction)"})
    kl_direction: str = field(default="anchor_target", metadata={
        "help": "with divergence kl: anchor_target = KL(anchor || target) (Bandarkar et al.) | "
                "target_anchor = KL(target || anchor)"})
    online_anchor_grad: bool = field(default=False, metadata={
        "help": "anchor_mode online: let gradients flow through the anchor's routing too (Bandarkar et al.)"})
    pooling: str = field(default="all", metadata={"help": "all | prompt | response"})
    router_site: str | None = field(default=None, metadata={
        "help": "router inside a decoder layer where it has several (JetMoE); none = the family default"})
    model_dtype: str = field(default="float32", metadata={"help": "dtype the weights are loaded in"})
    use_peft: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: NF4 4-bit base weights via bitsandbytes (attention/dense linears; needs use_peft)"})
    lora_preset: str = field(default="all", metadata={"help": "all | attention | experts | routers"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = field(default=0.0, metadata={"help": "must be 0 when LoRA reaches the fused experts"})
    routers_only: bool = field(default=False, metadata={"help": "train the routers alone (full or LoRA)"})
    logging_steps: float = field(default=1, metadata={"help": "log every N steps (ce_loss, js_loss|kl_loss, aux_loss)"})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: when the GPU has it)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "replace a non-empty output_dir (its old files are deleted first); otherwise it is refused"})

    probe_data: str | None = field(default=None, metadata={
        "help": "routing monitor probe: a held-out parallel JSONL file, or 'split' to hold probe_groups groups of "
                "the training corpus out of training; none = no monitor"})
    probe_groups: int = field(default=32, metadata={"help": "with probe_data split: groups held out (by seed)"})
    monitor_steps: int | None = field(default=None, metadata={
        "help": "run the probe every N steps; none = at the eval (by steps) or logging cadence, as often as "
                "monitor_max_cost allows"})
    monitor_max_cost: float = field(default=0.05, metadata={
        "help": "with monitor_steps none: the monitor's wall time may be at most this share of the training time"})
    english_drift_max: float | None = field(default=None, metadata={
        "help": "warn when the monitor's English drift (JS to the base model's English routing) exceeds this"})
    stop_on_drift: bool = field(default=False, metadata={
        "help": "with english_drift_max: stop training (and save a checkpoint) at the first step past it"})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.fp16
        if self.activation_checkpointing is None:  # TRL's default (on) or the user's value, under the name
            self.activation_checkpointing = self.gradient_checkpointing  # transformers 5 reads without a warning
        if self.gradient_checkpointing_kwargs is None and self.activation_checkpointing_kwargs is None:
            self.activation_checkpointing_kwargs = {"use_reentrant": False}  # hooks need the router graph
        super().__post_init__()
        self.train_langs = ",".join(parse_langs(self.train_langs) or []) or None
        # kept as its items (a list from here on); the trainer resolves them against the model once
        self.align_layers = layer_spec_items(self.align_layers, "field align_layers")
        choices = {"anchor_mode": ANCHOR_MODES, "divergence": ("js", "kl"),
                   "kl_direction": ("anchor_target", "target_anchor"),
                   "pooling": ("all", "prompt", "response"), "lora_preset": LORA_PRESETS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"field {name}: {getattr(self, name)!r} is not one of {allowed}")
        if self.online_anchor_grad and self.anchor_mode != "online":
            raise ValueError("field online_anchor_grad: needs anchor_mode online (cached priors carry no gradient)")
        if not (self.lambda_js >= 0 and self.lambda_js != float("inf")):
            raise ValueError(f"field lambda_js: must be a finite number >= 0, got {self.lambda_js}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"field max_steps: {self.max_steps} trains nothing; give a positive number of steps "
                             "(or -1 to train num_train_epochs epochs)")
        if self.max_steps == -1 and not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise ValueError(f"field num_train_epochs: must be a finite number > 0, got {self.num_train_epochs}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"field learning_rate: must be a finite number >= 0, got {self.learning_rate}")
        if self.load_in_4bit and not self.use_peft:
            raise ValueError("field load_in_4bit: 4-bit weights cannot be trained; add use_peft (QLoRA trains LoRA "
                             "adapters on the frozen 4-bit base)")
        if self.probe_groups < 1:
            raise ValueError(f"field probe_groups: must be a positive integer, got {self.probe_groups}")
        if not (math.isfinite(self.monitor_max_cost) and self.monitor_max_cost > 0):
            raise ValueError(f"field monitor_max_cost: a share of training time > 0 (0.05 = 5%), got "
                             f"{self.monitor_max_cost}")
        if self.monitor_steps is not None and self.monitor_steps < 1:
            raise ValueError(f"field monitor_steps: must be a positive integer (or none), got {self.monitor_steps}")
        if self.english_drift_max is not None:
            if not (math.isfinite(self.english_drift_max) and self.english_drift_max >= 0):
                raise ValueError(f"field english_drift_max: must be a finite number >= 0, got {self.english_drift_max}")
            if self.probe_data is None:
                raise ValueError("field english_drift_max: the drift is measured on a probe; set probe_data "
                                 "(a held-out parallel file, or 'split')")
        if self.stop_on_drift and self.english_drift_max is None:
            raise ValueError("field stop_on_drift: needs english_drift_max (the drift at which to stop)")
        langs = parse_langs(self.train_langs)
        if langs and set(langs) == {self.anchor} and self.lambda_js > 0:
            raise ValueError(f"field train_langs: only the anchor {self.anchor!r}; SARA aligns other languages to it, "
                             "so name at least one non-anchor language (or set lambda_js 0 for plain SFT)")
