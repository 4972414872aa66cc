"""Load a model + tokenizer the way every sara verb does, and batch token id lists.

    from sara_moe.runtime.loading import load_model_and_tokenizer, pad_batch
    model, tokenizer = load_model_and_tokenizer("runs/tiny", dtype="bfloat16", device="auto")
    input_ids, attention_mask = pad_batch(tokenizer, [[2, 5, 9], [2, 7]], side="left")

`from_pretrained` is the real path (a save_pretrained dir or a hub id when online);
`trust_remote_code` stays off unless the user asks. A tokenizer without a pad token pads with
its EOS token, else its UNK token (pads are always masked out, so the choice does not change
results); one with none of the three is refused. Every padded batch goes through `pad_batch`,
i.e. `tokenizer.pad` with that pad token. Before any download is attempted: a missing
path that looks like a path (`./x`, `/x`, `a/b/c`) is "no such directory" at once, and a hub
id that is neither cached nor reachable (offline, or huggingface.co does not answer in 3 s)
is refused without transformers' retries. Every `*.safetensors` of a local model is checked
for truncation first (`artifacts.check_safetensors`), so a damaged file is named in one line.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from sara_moe.data.corpus import looks_like_path
from sara_moe.runtime.artifacts import check_safetensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model_and_tokenizer(model_path: str, dtype: str = "float32", device: str | None = None,
                             trust_remote_code: bool = False, adapter: str | None = None,
                             device_map: str | None = None, from_pretrained_kwargs: dict | None = None):
    """`from_pretrained` model (eval mode, on `device` if given) + tokenizer; one-line errors.

    `adapter`: a PEFT adapter directory loaded on top (its tokenizer wins when it has one).
    `device_map` (e.g. "auto"): accelerate places the layers across devices; `device` is then ignored.
    `from_pretrained_kwargs`: more arguments for `from_pretrained`, e.g. `four_bit_kwargs(dtype)`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_source(model_path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    _check_causal_lm(model_path, trust_remote_code)
    placement = {**({"device_map": device_map} if device_map else {}), **(from_pretrained_kwargs or {})}
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=DTYPES[dtype],
                                                 trust_remote_code=trust_remote_code, **placement)
    tokenizer_source = str(model_path)
    if adapter:
        check_model_source(adapter, "adapter")
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ValueError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer_source = str(adapter)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token_id is not None else tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"{tokenizer_source}: the tokenizer has no pad, EOS or UNK token to pad with; add one "
                             "(tokenizer.add_special_tokens({'pad_token': '<pad>'}) and save_pretrained)")
        tokenizer.pad_token = fallback
    if device is not None and "device_map" not in placement:
        model = model.to(resolve_device(device))
    return model.eval(), tokenizer


def check_device_map(device_map: str | None) -> None:
    """A `device_map` spreads one model over the GPUs of one process; under a launcher every rank would
    load its own spread copy onto the same GPUs, so the two are refused together."""
    from sara_moe.runtime import distributed

    if device_map and distributed.launched():
        raise ValueError(f"--device_map {device_map}: spreads one model over this process's GPUs; run without "
                         "torchrun/accelerate launch (or drop --device_map to share the work across ranks)")


def _check_causal_lm(model_path, trust_remote_code: bool) -> None:
    """Refuse, in one line naming the model, what AutoModelForCausalLM cannot load: its own error lists
    every causal-LM config class (kilobytes) and never says that sara-moe needs a decoder-only model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return  # the checkpoint brings its own causal-LM class
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{model_path}: {config.model_type} is an encoder-decoder model; sara-moe aligns the "
                         "routers of decoder-only causal LMs (give a decoder-only MoE checkpoint)")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{model_path}: model_type {config.model_type!r} has no causal-LM class in transformers "
                         f"{_transformers_version()}; give a decoder-only MoE causal LM")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_model_source(name, what: str = "model") -> None:
    """One-line errors for a missing local path, an unreachable hub id, or damaged weight files."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{text}: not a {what} directory (a file); pass the directory save_pretrained wrote")
        if what == "model" and not (path / "config.json").is_file():
            raise ValueError(f"{text}: not a model directory (no config.json); "
                             "pass a directory written by save_pretrained or a hub id")
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors(weights)
        return
    if looks_like_path(text):
        raise FileNotFoundError(f"{text}: no such directory (pass a save_pretrained directory or a hub id)")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(text, "adapter_config.json" if what == "adapter" else "config.json")
    except ValueError:  # not a valid repo id either
        raise FileNotFoundError(f"{text}: no such directory, and not a valid hub id") from None
    if not isinstance(cached, str) and not _hub_reachable():
        raise FileNotFoundError(f"{text}: no such directory, and the hub is offline or unreachable, so it "
                                "cannot be a hub id either; pass a save_pretrained directory")


def pad_batch(tokenizer, sequences: list[list[int]], side: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` of token id lists, padded by the tokenizer's own `pad` with its pad
    token, on `side` ("left"/"right"; default: the tokenizer's `padding_side`). The one padding path
    besides TRL's collator, which pads training batches itself (right, the same pad token)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; load it with sara_moe.runtime.loading.load_model_and_tokenizer "
                         "(pads with EOS, else UNK) or set tokenizer.pad_token")
    batch = tokenizer.pad({"input_ids": [list(s) for s in sequences]}, padding=True, padding_side=side,
                          return_attention_mask=True, return_tensors="pt")
    return batch["input_ids"].long(), batch["attention_mask"].long()


def four_bit_kwargs(dtype: str = "bfloat16", device: str = "auto") -> dict:
    """`from_pretrained` arguments for a QLoRA base: NF4 weights (double-quantised) through
    transformers' `BitsAndBytesConfig`, computing in `dtype`, placed whole on this rank's device.

    bitsandbytes quantises `nn.Linear` layers (attention, dense MLPs); transformers 5 keeps MoE
    experts as fused 3-D parameters and routers as bare parameters, so those stay in `dtype`.
    The storage dtype equals `dtype` so FSDP2 can shard the 4-bit weights (accelerate's advice).
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError("field load_in_4bit: needs bitsandbytes (pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    from sara_moe.runtime.distributed import device as rank_device

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=DTYPES[dtype], bnb_4bit_quant_storage=DTYPES[dtype])
    return {"quantization_config": config, "device_map": {"": str(rank_device(device))}}
