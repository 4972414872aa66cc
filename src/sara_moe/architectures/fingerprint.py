"""What identifies a model for a cached artefact: one fingerprint scheme for priors, steering specs and training.

    from sara_moe.architectures.fingerprint import model_fingerprint, fingerprint_diff
    fp = model_fingerprint(model, tokenizer)            # {model_config, routers, num_experts, weight_files, ...}
    fp = model_fingerprint(model, tokenizer, pooling="response", layers=[1, 2], anchor="en")   # + run facts
    fingerprint_diff(recorded, fp)                      # the keys whose values differ

The model part is hashes of the config (run-dependent keys dropped), the tokenizer
(vocabulary, merges, special tokens), the chat template, the router weights (rounded to
bfloat16, so fp32 and bf16 loads of one checkpoint agree while another seed does not), the
verified scoring rule and, when the model was loaded from a local directory, the sha256 of
each weight file. Keyword facts of the run that produced the artefact (pooling span, layers,
anchor language) are added as given. The data part is a hash per example of its text
(`runtime.artifacts.text_sha`). Each consumer compares the keys it depends on: a steering
spec only `config_hash` (a list of expert ids stays meaningful on any load or adapter),
priors every key (they hold routing values).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from sara_moe.architectures import find_routers, model_config, router_weight
from sara_moe.data.corpus import PLAIN_TEMPLATE
from sara_moe.runtime.artifacts import file_sha256, sha

# Config keys that describe a load or a run, not the network: tools rewrite them freely.
VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "name_or_path", "torch_dtype", "dtype",
                        "output_router_logits", "router_aux_loss_coef", "use_cache", "pad_token_id",
                        "_attn_implementation", "_attn_implementation_autoset", "_experts_implementation",
                        "architectures", "tie_word_embeddings", "output_attentions", "output_hidden_states",
                        "return_dict", "quantization_config"}  # 4-bit is a way to load, like dtype


def config_hash(model) -> str:
    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in VOLATILE_CONFIG_KEYS}

    return sha(clean(model_config(model).to_dict()))


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return sha(body + json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str))


def chat_template_hash(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    return sha(template if template else "plain:" + PLAIN_TEMPLATE)


def router_hash(model) -> str:
    """Hash of every router's weight (and bias), rounded to bfloat16 so fp32/bf16 loads agree."""
    digest = hashlib.sha256()
    for site in find_routers(model):
        for name, param in sorted(site.module.named_parameters()):
            with _gathered(param):  # ZeRO-3 keeps a shard per rank; every rank calls this
                values = param.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
                digest.update(f"{site.layer}.{name}{tuple(param.shape)}".encode())
                digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def _gathered(param):
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param])
    return contextlib.nullcontext()


def _rows(weight) -> int:
    return int(getattr(weight, "ds_shape", weight.shape)[0])  # the full shape of a ZeRO-3 shard


_WEIGHT_FILE_CACHE: dict = {}


def weight_file_hashes(model) -> dict | None:
    """{file name: sha256} of the local directory the model was loaded from; None if there is none."""
    source = getattr(model_config(model), "_name_or_path", "") or ""
    folder = Path(source) if source else None
    if folder is None or not folder.is_dir():
        return None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    hashes = {}
    for path in files:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _WEIGHT_FILE_CACHE:  # hashed once per process
            _WEIGHT_FILE_CACHE[key] = file_sha256(path)[:16]
        hashes[path.name] = _WEIGHT_FILE_CACHE[key]
    return hashes


def model_fingerprint(model, tokenizer=None, **run_facts) -> dict:
    """The fingerprint scheme of the module docstring; `run_facts` (JSON-able) are recorded as given."""
    sites = find_routers(model)
    fp = {"model_config": config_hash(model), "routers": router_hash(model),
          "num_experts": _rows(router_weight(sites[0])), "weight_files": weight_file_hashes(model)}
    if tokenizer is not None:
        fp.update(tokenizer=tokenizer_hash(tokenizer), chat_template=chat_template_hash(tokenizer))
    return {**fp, **run_facts, "scoring": sites[0].scoring, "router_site": sites[0].site}


def fingerprint_diff(recorded: dict, current: dict, keys=None) -> list[str]:
    """Keys whose values differ; `weight_files` only counts when both sides have them."""
    bad = []
    for key in keys or recorded:
        a, b = recorded.get(key), current.get(key)
        if key == "weight_files" and (a is None or b is None):
            continue
        if a != b:
            bad.append(key)
    return bad
