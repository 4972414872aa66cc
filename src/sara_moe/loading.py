"""Load a model + tokenizer the way every sara verb does, and batch token id lists.

    from sara_moe.loading import load_model_and_tokenizer, pad_batch
    model, tokenizer = load_model_and_tokenizer("runs/tiny", dtype="bfloat16", device="auto")
    input_ids, attention_mask = pad_batch([[2, 5, 9], [2, 7]], tokenizer.pad_token_id, side="left")

`from_pretrained` is the real path (a save_pretrained dir or a hub id when online);
`trust_remote_code` stays off unless the user asks. A tokenizer without a pad token pads with
its EOS token (pads are always masked out, so the choice does not change results).
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model_and_tokenizer(model_path: str, dtype: str = "float32", device: str | None = None,
                             trust_remote_code: bool = False, adapter: str | None = None):
    """`from_pretrained` model (eval mode, on `device` if given) + tokenizer; one-line errors.

    `adapter`: a PEFT adapter directory loaded on top (its tokenizer wins when it has one).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(str(model_path))
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(f"{model_path}: not a model directory (no config.json); "
                         "pass a directory written by save_pretrained or a hub id")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=DTYPES[dtype],
                                                 trust_remote_code=trust_remote_code)
    tokenizer_source = str(model_path)
    if adapter:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ValueError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer_source = str(adapter)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(resolve_device(device))
    return model.eval(), tokenizer


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists into `(input_ids, attention_mask)` on the given side."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask
