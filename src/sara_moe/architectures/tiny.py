"""Tiny random-init MoE models and locally built tokenizers (no hub needed).

    sara tiny-model --arch qwen3_moe --data examples/parallel.jsonl --output_dir runs/tiny

    from sara_moe.architectures.tiny import build_tokenizer, build_tiny_model, TINY_ARCHS
    tok = build_tokenizer(["The cat sleeps.", "Paka analala."])
    model = build_tiny_model("mixtral", vocab_size=len(tok), seed=0)

Used by the tests (one model per supported architecture, saved with `save_pretrained` and
loaded back with `from_pretrained`), by the README's quickstart, and by the testbed. The
configs are the smallest that keep each family's routing features: dense leading layers for
DeepSeek/GLM4, shared experts for Qwen2-MoE/DeepSeek, sigmoid routers with expert groups for
DeepSeek-V3/GLM4-MoE, a router bias for GPT-OSS, PhiMoE's sparsemixer (its dispatch weights
are no distribution; it is aligned as `softmax_aux`, verified through its own aux loss), JetMoE's
two routers per layer (attention heads and MLP experts; `router_site` picks one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from sara_moe.runtime.options import parse_config

COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
              max_position_embeddings=256, tie_word_embeddings=False)

# arch -> (config class, causal-LM class, family-specific config fields)
TINY_ARCHS: dict[str, tuple[str, str, dict]] = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        head_dim=8, norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        intermediate_size=32, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
        topk_method="greedy", num_key_value_heads=4)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1,
        num_key_value_heads=4)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, head_dim=8, n_group=2, topk_group=1)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 2)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
    # two routers per layer: attention heads (self_attention.experts.router) and MLP experts (mlp.router);
    # its attention heads are num_key_value_heads * num_experts_per_tok
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, kv_channels=8)),
}

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


def build_tokenizer(texts, vocab_size: int = 2000):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer.

    Adds `<s>` at the start of every sequence (so "special tokens included" is exercised)
    and uses `<pad>` for padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_config(arch: str, vocab_size: int, **overrides):
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(TINY_ARCHS)}")
    config_cls, _, fields = TINY_ARCHS[arch]
    kwargs = {**COMMON, **fields, "vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 2,
              "eos_token_id": 3, **overrides}
    return getattr(transformers, config_cls)(**kwargs)


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0, **overrides):
    """A random-init causal LM of family `arch`, small enough for a CPU test (~100k params)."""
    config = tiny_config(arch, vocab_size, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, TINY_ARCHS[arch][1])(config)
    # Random routers are near-uniform at init std 0.02; widen them so routing has structure.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                param.normal_(0.0, 1.0)
    return model.eval()


def _texts_from_corpus(path: str):
    from sara_moe.data.corpus import read_corpus, render_plain

    for group in read_corpus(path):
        for value in group.texts.values():
            yield render_plain(value)


def save_tiny(arch: str, output_dir: str, texts, seed: int = 0, vocab_size: int = 2000,
              overwrite: bool = False, config: dict | None = None) -> Path:
    """Build tokenizer + model and `save_pretrained` both into `output_dir` (published via `artifacts`),
    with `tiny_model_config.json`: `config` (the resolved `TinyModelConfig`), else these arguments."""
    from sara_moe.runtime import artifacts

    out = Path(output_dir)
    artifacts.claim(out, "config.json", overwrite)
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    model = build_tiny_model(arch, vocab_size=len(tokenizer), seed=seed)
    config = config or artifacts.config_dict(TinyModelConfig(data=None, output_dir=str(out), arch=arch, seed=seed,
                                                             vocab_size=vocab_size, overwrite=overwrite))
    with artifacts.publishing(out, overwrite, primary="config.json") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "tiny_model_config.json").write_text(json.dumps(config, indent=2))
    return out


@dataclass
class TinyModelConfig:
    """Options of `sara tiny-model` (flags and YAML keys are these names)."""

    data: str = field(metadata={"help": "parallel corpus whose text trains the tokenizer"})
    output_dir: str = field(metadata={"help": "folder for the model, tokenizer and tiny_model_config.json"})
    arch: str = field(default="qwen3_moe", metadata={"help": "MoE family", "choices": sorted(TINY_ARCHS)})
    seed: int = field(default=0, metadata={"help": "initialisation seed"})
    vocab_size: int = field(default=2000, metadata={"help": "BPE vocabulary size of the tokenizer"})
    overwrite: bool = field(default=False, metadata={"help": "replace a model already in output_dir"})


def tiny_model(cfg: TinyModelConfig) -> Path:
    """The tiny model of `cfg.arch`, its tokenizer trained on `cfg.data`'s texts, saved to `cfg.output_dir`."""
    from sara_moe.runtime import artifacts

    return save_tiny(cfg.arch, cfg.output_dir, list(_texts_from_corpus(cfg.data)), cfg.seed, cfg.vocab_size,
                     cfg.overwrite, config=artifacts.config_dict(cfg))


def tiny_model_cli(argv=None) -> int:
    cfg = parse_config(TinyModelConfig, argv, "sara tiny-model", __doc__.split("\n\n")[0])
    out = tiny_model(cfg)
    print(f"tiny {cfg.arch} model saved to {out}")
    return 0
