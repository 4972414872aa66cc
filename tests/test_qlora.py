"""`sara train --load_in_4bit`: QLoRA (NF4 base via bitsandbytes, LoRA on attention, experts, routers)."""

from __future__ import annotations

import pytest
import torch
from test_train import config, expected_js, first_batch

from sara_moe import priors as P
from sara_moe.train import SaraConfig, build_trainer


@pytest.fixture(scope="module")
def qwen_priors(tiny_model_dir, example_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora_priors") / "priors.safetensors"
    return P.extract_priors(str(tiny_model_dir("qwen3_moe")), example_corpus, out, progress=False)


def test_qlora_trains_lora_on_4bit_attention_experts_and_routers(tiny_model_dir, example_corpus, qwen_priors, tmp_path):
    pytest.importorskip("bitsandbytes", reason="optional: bitsandbytes is not installed (pip install bitsandbytes)")
    # priors of the full-precision model fit its 4-bit load (quantisation is a way to load, like dtype)
    cfg = config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus, qwen_priors, load_in_4bit=True,
                 use_peft=True, lora_preset="all", max_steps=1, lambda_js=1.5, use_cpu=True)
    trainer, _ = build_trainer(cfg)
    model = trainer.model
    layer = model.base_model.model.model.layers[1]
    assert type(layer.self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert type(layer.self_attn.q_proj.base_layer.weight).__name__ == "Params4bit"
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    for site in ("self_attn.q_proj", "self_attn.o_proj", "mlp.experts", "mlp.gate"):
        assert any(f"layers.1.{site}" in n for n in trainable), site
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    # the alignment term on the 4-bit model equals an independent recomputation from output_router_logits
    cache = P.load_priors(qwen_priors)
    batch = first_batch(trainer)
    model.train()
    want = expected_js(model, batch, cache.table, cache.layers, trainer.align_layers, sigmoid=False)
    with torch.no_grad():
        trainer.compute_loss(model, dict(batch))
    assert abs(trainer._metrics["train"]["js_loss"][-1] - want) < 1e-5
    probs = trainer._recorder.probabilities(batch["attention_mask"])
    assert all(p.dtype == torch.float32 for p in probs.values())  # the loss is computed in fp32

    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "js_loss" in h]
    assert torch.isfinite(torch.tensor([log["loss"], log["js_loss"]])).all() and log["js_loss"] > 0.01
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), trainable[n])]
    # LoRA B starts at zero (so A has no gradient in step 1): every B tensor moved, attention, experts and routers
    assert {n for n in changed if "lora_B" in n} == {n for n in trainable if "lora_B" in n}


def test_load_in_4bit_needs_peft(tmp_path):
    with pytest.raises(ValueError, match="field load_in_4bit: .*use_peft"):
        SaraConfig(output_dir=str(tmp_path), load_in_4bit=True, report_to="none")


def test_shipped_qlora_config_parses_into_a_4bit_lora_run(tmp_path):
    from conftest import REPO
    from trl import TrlParser

    (cfg,) = TrlParser((SaraConfig,)).parse_args_and_config(
        args=["--config", str(REPO / "configs" / "sara_qlora.yaml"), "--output_dir", str(tmp_path / "run")])
    assert cfg.load_in_4bit and cfg.use_peft and cfg.lora_preset == "all" and cfg.lora_dropout == 0
    assert cfg.model_dtype == "bfloat16" and cfg.lambda_js == 1.5
