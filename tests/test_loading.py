"""Model loading shared by every verb: PEFT adapters on top of a base model, and its errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sara_moe.evaluation.evaluate import load_model
from sara_moe.runtime.loading import load_model_and_tokenizer, pad_batch


def test_adapter_is_loaded_on_top_of_the_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir = tiny_model_dir("qwen3_moe")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                           target_parameters=["mlp.gate.weight"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=ids).logits
    model, tokenizer = load_model(str(base_dir), adapter=str(tmp_path / "adapter"), device="cpu")
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, base, atol=1e-4)  # the adapter really changed the model
    assert tokenizer.pad_token_id is not None


def test_loading_errors_are_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"no adapter_config.json"):
        load_model_and_tokenizer(str(tiny_model_dir("qwen3_moe")), adapter=str(tmp_path))
    with pytest.raises(ValueError, match=r"not a model directory \(no config.json\)"):
        load_model_and_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match=r"dtype 'fp8'"):
        load_model_and_tokenizer(str(tiny_model_dir("qwen3_moe")), dtype="fp8")


def test_pad_batch_is_the_tokenizers_own_padding(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen3_moe"))
    pad = tokenizer.pad_token_id
    ids, mask = pad_batch(tokenizer, [[5, 6, 7], [8]], side="left")
    assert ids.tolist() == [[5, 6, 7], [pad, pad, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert tokenizer.padding_side == "right"  # the default side is the tokenizer's
    ids, mask = pad_batch(tokenizer, [[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [8, pad, pad]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    tokenizer.pad_token = None  # one pad-id rule: the tokenizer's (load_model_and_tokenizer sets it), no fallback
    with pytest.raises(ValueError, match="no pad token; load it with sara_moe.runtime.loading.load_model_and_tokenizer"):
        pad_batch(tokenizer, [[5], [6, 7]])
