"""Per-architecture facts that live in `architectures`: LoRA target names, experts per token, the PhiMoE config field."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn

from sara_moe.architectures import (
    experts_per_token,
    expose_num_experts,
    lora_targets,
    model_config,
    moe_block_classes,
    text_config,
)
from sara_moe.architectures.families import build_tiny_family, moe_families
from sara_moe.train import lora_config


def tiny(model_type: str):
    family = {f.model_type: f for f in moe_families()}.get(model_type)
    if family is None:
        pytest.skip(f"this transformers has no {model_type}")
    return build_tiny_family(family, seed=0)


def test_lora_targets_name_real_parameters_and_peft_wraps_the_router():
    from peft import get_peft_model

    model = tiny("qwen3_moe")
    targets = lora_targets(model)
    assert targets["routers"] == ["mlp.gate.weight"] and "q_proj" in targets["attention"]
    assert targets["experts"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    names = [name for name, _ in model.named_parameters()]
    for target in targets["routers"] + targets["experts"]:
        assert any(name.endswith(target) for name in names), target
    wrapped = get_peft_model(model, lora_config(model, "routers", r=2, alpha=4))
    assert any("lora" in name and ".mlp.gate" in name for name, _ in wrapped.named_parameters())


def test_router_without_a_bare_weight_gets_its_projection_as_lora_target():
    model = tiny("gemma4_text")  # the router's [experts, hidden] matrix is router.proj.weight
    assert lora_targets(model)["routers"] == ["router.proj.weight"]


def test_experts_per_token_reads_the_config_and_falls_back_to_two():
    def holder(**fields):
        module = nn.Module()
        module.config = SimpleNamespace(**fields)
        return module

    assert experts_per_token(holder(num_experts_per_tok=3)) == 3
    assert experts_per_token(holder(moe_topk=6)) == 6
    assert experts_per_token(holder(num_experts=8)) == 2
    assert experts_per_token(holder(text_config=SimpleNamespace(num_experts_per_tok=4))) == 4


def test_phimoe_gets_num_experts_for_trl_and_peft_wrappers_are_seen_through():
    from peft import get_peft_model

    model = tiny("phimoe")
    assert not hasattr(model.config, "num_experts") and experts_per_token(model) == 2
    expose_num_experts(model)
    assert model.config.num_experts == model.config.num_local_experts == 8
    wrapped = get_peft_model(model, lora_config(model, "attention", r=2, alpha=4))
    assert model_config(wrapped) is model.config and text_config(wrapped).model_type == "phimoe"


def test_moe_block_classes_are_the_blocks_the_routers_feed_through_peft_too():
    from peft import get_peft_model

    model = tiny("qwen3_moe")
    assert [cls.__name__ for cls in moe_block_classes(model)] == ["Qwen3MoeSparseMoeBlock"]
    wrapped = get_peft_model(model, lora_config(model, "routers", r=2, alpha=4))
    assert [cls.__name__ for cls in moe_block_classes(wrapped)] == ["Qwen3MoeSparseMoeBlock"]
    gemma = tiny("gemma4_text")  # the router sits in the decoder layer itself
    assert [cls.__name__ for cls in moe_block_classes(gemma)] == ["Gemma4TextDecoderLayer"]
