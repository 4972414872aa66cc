"""Per-language evaluation: multiple choice by log-likelihood and generation with exact match.

    sara eval --model runs/sara --data examples/eval_mc.jsonl --output_dir runs/sara/eval
    sara eval --model base --adapter runs/lora --data examples/eval_gen.jsonl --output_dir out \\
        --temperature 0.7 --seeds 0,1,2
    sara eval --model PATH --data items.jsonl --output_dir out --steer spec.json --steer_strength 0,2 --steer_langs sw,yo
    sara eval --model PATH --output_dir out --backend lm-eval --tasks global_mmlu_full_sw,belebele_swh_Latn
    sara eval --config eval.yaml --model runs/other         # YAML of EvalConfig's fields; flags override it

    from sara_moe.evaluation.evaluate import score_mc, generate_answers
    rows = score_mc(model, tokenizer, items)        # one dict per item: loglikelihoods, prediction, acc

**Multiple choice** (items with `choices`, see `evaluation.items`): the lm-eval Global-MMLU/Belebele
prompt, continuations `" A"`, `" B"`, ... scored by summed log-likelihood, tokenized exactly
like lm-eval's HFLM (`corpus.encode_pair`: `enc(context + continuation)` split at
`len(enc(context))`, the tokenizer's default special tokens, left truncation to the model
length; batches padded by `loading.pad_batch`); `acc` = argmax is
the answer; `acc_norm` (reported for passage items, as lm-eval's Belebele does) divides by the
continuation's length in characters. **Generation**: `"{question}\nAnswer:"`, greedy (or
sampled with `--temperature`, one run per `--seeds` entry), stopped at a blank line or
"Question:", numeric extraction (`items.extract_number`), `exact_match`.
Deterministic runs (MC, greedy) run once whatever `--seeds` says.

Outputs in `--output_dir`, never overwriting earlier ones (timestamped like lm-eval, published
through `artifacts`; each results file carries `metadata`: versions, git commit, device,
seeds, command line, resolved config): `results_<time>[_steer-<S>].json` (`per_language[lang] =
{metric: mean over seeds, "n", "per_seed": [{"seed", metric}]}`, task, metrics, model,
steer info), `samples_<time>[_steer-<S>].jsonl` (every item's prediction and score per seed),
`eval_config_<time>.json` (the resolved `EvalConfig`, a valid `--config`). With `--steer`,
`sara_moe.steering.steer.steering` is wrapped around each steered language's evaluation, one results
file per strength. With `--deactivate` (a `sara steer deactivate` spec), `steering.deactivate.deactivation`
is wrapped around every language's evaluation (experts masked, neurons zeroed); results record it.

Under a launcher (`torchrun --nproc_per_node N`) the multiple-choice batches are dealt to the
ranks and their scores summed over ranks (each from one rank, so bit for bit); generation runs
whole on every rank (its sampling stream is one per seed). Rank 0 writes every file (`artifacts`,
one timestamp for all ranks); the others return once the files exist.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sara_moe.data.corpus import encode_pair, encode_prompt
from sara_moe.evaluation.items import (
    EvalItem,
    by_language,
    extract_number,
    gen_prompt,
    mc_continuations,
    mc_prompt,
    numbers_match,
    read_items,
)
from sara_moe.runtime import artifacts, distributed
from sara_moe.runtime.artifacts import unique_stamp
from sara_moe.runtime.loading import DTYPES, check_device_map, load_model_and_tokenizer, pad_batch
from sara_moe.runtime.options import parse_config

GEN_STOP = ("\n\n", "Question:")


@dataclass
class EvalConfig:
    """Options of `sara eval` (flags and YAML keys are these names; `evaluate()` takes the object)."""

    model: str = field(metadata={"help": "model directory or hub id"})
    output_dir: str = field(metadata={"help": "folder for results_*.json, samples_*.jsonl, eval_config_*.json"})
    data: str | None = field(default=None, metadata={"help": "eval items JSONL (multiple choice or generation)"})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter directory applied on top of model"})
    task: str | None = field(default=None, metadata={"help": "mc | gen; none = inferred from the items",
                                                     "choices": ["mc", "gen"]})
    batch_size: int = field(default=8, metadata={"help": "items per forward"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "dtype the weights are loaded in",
                                                    "choices": sorted(DTYPES)})
    device_map: str | None = field(default=None, metadata={
        "help": "e.g. auto: spread one model over this process's GPUs (a model larger than one GPU); no launcher"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={
        "help": "sampling seeds (generation with temperature > 0; deterministic runs use the first)"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    max_new_tokens: int = field(default=32, metadata={"help": "generation length"})
    langs: list[str] | None = field(default=None, metadata={"help": "languages to evaluate; none = all in data"})
    backend: str = field(default="builtin", metadata={"help": "builtin | lm-eval (lm-evaluation-harness)",
                                                      "choices": ["builtin", "lm-eval"]})
    tasks: list[str] | None = field(default=None, metadata={
        "help": "lm-eval task names (with backend lm-eval; none = data through local YAMLs)"})
    steer: str | None = field(default=None, metadata={"help": "steering spec JSON (sara steer identify)"})
    steer_strengths: list[float] | None = field(default=None, metadata={
        "help": "steering strengths, one results file each; none = 1.0",
        "aliases": ["--steer_strength", "--steer-strength"]})
    steer_langs: list[str] | None = field(default=None, metadata={"help": "languages to steer; none = all"})
    deactivate: str | None = field(default=None, metadata={
        "help": "deactivation spec JSON (sara steer deactivate): experts masked, neurons zeroed for every language"})
    arm: str | None = field(default=None, metadata={"help": "arm name recorded in results (sara report groups by it)"})
    trust_remote_code: bool = False


# ----------------------------------------------------------------------------- model


def load_model(model_path: str, adapter: str | None = None, dtype: str = "float32", device: str = "auto",
               trust_remote_code: bool = False, device_map: str | None = None):
    """(model, tokenizer) from a save_pretrained dir (or hub id), optionally with a PEFT adapter on top;
    `device_map` (e.g. auto) spreads one model over this process's GPUs instead of placing it on `device`."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    check_device_map(device_map)
    return load_model_and_tokenizer(model_path, dtype, device, trust_remote_code, adapter, device_map=device_map)


def model_max_length(model) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- scorers


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8,
                   desc: str = "loglikelihood") -> list[float]:
    """Summed log-probability of each continuation given its context (lm-eval's loglikelihood)."""
    max_length, device = model_max_length(model), _device(model)
    encoded = []
    for context, continuation in requests:
        context_ids, cont_ids = encode_pair(context, continuation, tokenizer)
        if not cont_ids:
            raise ValueError(f"continuation {continuation!r} tokenizes to nothing after {context[-30:]!r}")
        # model input: the last max_length+1 tokens minus the final one (lm-eval); logits at the last
        # len(cont_ids) input positions predict the continuation's tokens
        encoded.append(((context_ids + cont_ids)[-(max_length + 1):][:-1], cont_ids))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # longest first, less padding
    scores = torch.zeros(len(encoded), dtype=torch.float64)
    starts = range(0, len(order), batch_size)
    # under a launcher each rank scores its share of the batches; a score comes from one rank, so the
    # sum over ranks is that score bit for bit, and batches are the same as in one process
    for start in tqdm([starts[i] for i in distributed.my_chunks(len(starts))], desc=desc, leave=False):
        rows = order[start:start + batch_size]
        ids, mask = pad_batch(tokenizer, [encoded[i][0] for i in rows], side="right")  # logits indexed from the left
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for r, i in enumerate(rows):
            seq, cont_ids = encoded[i]
            logprobs = torch.log_softmax(logits[r, len(seq) - len(cont_ids):len(seq)].float(), dim=-1)
            targets = torch.tensor(cont_ids, device=logprobs.device)
            scores[i] = float(logprobs.gather(1, targets[:, None]).sum())
    return distributed.all_sum(scores).tolist()


def score_mc(model, tokenizer, items: list[EvalItem], batch_size: int = 8) -> list[dict]:
    """Per item: log-likelihood of each letter, predicted index, acc and acc_norm (0/1)."""
    requests, spans = [], []
    for item in items:
        context = mc_prompt(item)
        conts = mc_continuations(item)
        spans.append((len(requests), len(conts)))
        requests.extend((context, cont) for cont in conts)
    lls = loglikelihoods(model, tokenizer, requests, batch_size, desc=f"mc {items[0].lang}" if items else "mc")
    rows = []
    for item, (start, count) in zip(items, spans):
        item_lls = lls[start:start + count]
        lengths = [len(cont.strip()) for cont in mc_continuations(item)]  # lm-eval: len(choice) in characters
        pred = max(range(count), key=lambda k: item_lls[k])
        pred_norm = max(range(count), key=lambda k: item_lls[k] / lengths[k])
        rows.append({"id": item.id, "lang": item.lang, "answer": item.answer, "loglikelihoods": item_lls,
                     "prediction": pred, "acc": float(pred == item.answer),
                     "acc_norm": float(pred_norm == item.answer)})
    return rows


def _cut_at_stop(text: str, stops=GEN_STOP) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


@torch.no_grad()
def generate_answers(model, tokenizer, items: list[EvalItem], batch_size: int = 8, max_new_tokens: int = 32,
                     temperature: float = 0.0, seed: int = 0) -> list[dict]:
    """Per item: the generated text (cut at a stop string), the extracted number and exact_match."""
    device = _device(model)
    max_context = max(1, model_max_length(model) - max_new_tokens)
    torch.manual_seed(seed)
    rows = []
    for start in tqdm(range(0, len(items), batch_size), desc=f"gen {items[0].lang}" if items else "gen",
                      leave=False):
        batch = items[start:start + batch_size]
        seqs = [encode_prompt(gen_prompt(item), tokenizer)[-max_context:] for item in batch]
        ids, mask = pad_batch(tokenizer, seqs, side="left")  # generation continues every row at the right edge
        width = ids.shape[1]
        kwargs = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, top_k=None,
                             top_p=None, **kwargs)
        for item, new_ids in zip(batch, out[:, width:].tolist()):
            text = _cut_at_stop(tokenizer.decode(new_ids, skip_special_tokens=True))
            number = extract_number(text)
            rows.append({"id": item.id, "lang": item.lang, "answer": item.answer, "generation": text,
                         "prediction": number, "exact_match": float(numbers_match(number, item.answer))})
    return rows


# ----------------------------------------------------------------------------- results


def aggregate(rows_by_seed: dict[int, list[dict]], metrics: list[str]) -> dict:
    """`per_language[lang] = {metric: mean over seeds, "std": {...}, "n", "per_seed": [...]}`."""
    per_language: dict[str, dict] = {}
    langs = sorted({row["lang"] for rows in rows_by_seed.values() for row in rows})
    for lang in langs:
        per_seed = []
        for seed, rows in rows_by_seed.items():
            mine = [row for row in rows if row["lang"] == lang]
            per_seed.append({"seed": seed, **{m: sum(r[m] for r in mine) / len(mine) for m in metrics}})
        n = sum(1 for row in next(iter(rows_by_seed.values())) if row["lang"] == lang)
        entry: dict = {m: sum(s[m] for s in per_seed) / len(per_seed) for m in metrics}
        entry["std"] = {m: _std([s[m] for s in per_seed]) for m in metrics}
        entry.update(n=n, per_seed=per_seed)
        per_language[lang] = entry
    return per_language


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def write_results(out: Path, stamp: str, suffix: str, results: dict, sample_rows: list[dict]) -> Path:
    results_path = out / f"results_{stamp}{suffix}.json"
    samples_path = out / f"samples_{stamp}{suffix}.jsonl"
    results["samples_file"] = samples_path.name
    artifacts.write_jsonl(samples_path, sample_rows, overwrite=False)
    artifacts.write_json(results_path, results, overwrite=False)  # last: its presence means both are complete
    return results_path


# ----------------------------------------------------------------------------- run


def _steering_context(model, spec, strength, steer_langs, lang):
    """`steer.steering` around a steered language's evaluation; a no-op otherwise."""
    if spec is None or (steer_langs is not None and lang not in steer_langs):
        return contextlib.nullcontext()
    from sara_moe.steering import steer

    @contextlib.contextmanager
    def steered():
        with steer.steering(model, spec, strength, steer_langs) as handle:
            if steer_langs is not None:
                handle.set_language(lang)
            yield handle

    return steered()


def run_builtin(config: EvalConfig, model, tokenizer, items: list[EvalItem], task: str, spec=None,
                strength: float | None = None) -> tuple[dict, list[dict]]:
    """Evaluate every language (and seed); returns (per_language, sample rows)."""
    has_passages = any(item.passage for item in items)
    metrics = (["acc", "acc_norm"] if has_passages else ["acc"]) if task == "mc" else ["exact_match"]
    seeds = list(config.seeds) if task == "gen" and config.temperature > 0 else [config.seeds[0]]
    rows_by_seed: dict[int, list[dict]] = {}
    for seed in seeds:
        rows: list[dict] = []
        for lang, lang_items in tqdm(by_language(items).items(), desc=f"eval seed {seed}"):
            with _steering_context(model, spec, strength, config.steer_langs, lang):
                if task == "mc":
                    lang_rows = score_mc(model, tokenizer, lang_items, config.batch_size)
                else:
                    lang_rows = generate_answers(model, tokenizer, lang_items, config.batch_size,
                                                 config.max_new_tokens, config.temperature, seed)
            rows.extend({**row, "seed": seed} for row in lang_rows)
        rows_by_seed[seed] = rows
    return aggregate(rows_by_seed, metrics), [row for rows in rows_by_seed.values() for row in rows]


def evaluate(config: EvalConfig) -> list[Path]:
    """Run `config`; returns the results files written (one per steering strength)."""
    if config.batch_size < 1 or config.max_new_tokens < 1 or not config.seeds:
        raise ValueError("--batch-size and --max-new-tokens must be positive and --seeds non-empty")
    if not (math.isfinite(config.temperature) and config.temperature >= 0):
        raise ValueError(f"--temperature {config.temperature}: must be a finite number >= 0 (0 = greedy)")
    bad = [x for x in config.steer_strengths or [] if not math.isfinite(x)]
    if bad:
        raise ValueError(f"--steer-strength {bad[0]}: must be a finite number (it is added to router logits)")
    if config.backend not in ("builtin", "lm-eval"):
        raise ValueError(f"--backend {config.backend!r}: choose builtin or lm-eval")
    if config.steer and config.backend != "builtin":
        raise ValueError("--steer works with the builtin backend only")
    if config.deactivate and config.backend != "builtin":
        raise ValueError("--deactivate works with the builtin backend only")
    task, items = (None, [])
    if config.data:
        task, items = read_items(config.data, config.task, config.langs)
        config.task = task
    elif config.backend == "builtin" or not config.tasks:
        raise ValueError("--data is required (or --backend lm-eval --tasks ...)")
    out = Path(config.output_dir)
    place = str(distributed.device(config.device))  # under a launcher: joins its process group, this rank's device
    model, tokenizer = load_model(config.model, config.adapter, config.dtype, place, config.trust_remote_code,
                                  config.device_map)
    spec = None
    strengths: list = [None]
    if config.steer:  # a spec that does not fit the model is refused before anything is written
        from sara_moe.steering import steer

        spec = steer.load_spec(config.steer, model, tokenizer)
        strengths = list(config.steer_strengths or [1.0])
    off = None
    if config.deactivate:  # refused before anything is written, like a steering spec
        from sara_moe.steering import deactivate

        off = deactivate.load_deactivation(config.deactivate, model)
    out.mkdir(parents=True, exist_ok=True)
    stamp = unique_stamp(out)
    resolved = artifacts.config_dict(config)
    artifacts.write_json(out / f"eval_config_{stamp}.json", resolved, overwrite=False)
    base = {"model": config.model, "adapter": config.adapter, "data": config.data, "arm": config.arm,
            "backend": config.backend, "config_file": f"eval_config_{stamp}.json",
            "metadata": artifacts.run_metadata(resolved, seed=config.seeds, device=config.device)}
    if config.backend == "lm-eval":
        from sara_moe.evaluation.lm_eval_bridge import run_lm_eval

        per_language, rows, info = run_lm_eval(config, model, tokenizer, items, task)
        written = [write_results(out, stamp, "", {**base, **info, "per_language": per_language}, rows)]
        artifacts.wait_for_main()
        return written
    metrics = (["acc", "acc_norm"] if any(i.passage for i in items) else ["acc"]) if task == "mc" else ["exact_match"]
    written = []
    for strength in strengths:
        with contextlib.nullcontext() if off is None else deactivate.deactivation(model, off):
            per_language, rows = run_builtin(config, model, tokenizer, items, task, spec, strength)
        results = {**base, "task": task, "metrics": metrics, "per_language": per_language,
                   "seeds": config.seeds if task == "gen" and config.temperature > 0 else config.seeds[:1],
                   "temperature": config.temperature if task == "gen" else None,
                   "steer": None if spec is None else {"spec": config.steer, "strength": strength,
                                                       "langs": config.steer_langs},
                   "deactivate": None if off is None else {"spec": config.deactivate, "source": off.get("source"),
                                                           "experts": sum(len(e["experts"]) for e in off["experts"]),
                                                           "neurons": sum(len(e["neurons"]) for e in off["neurons"])}}
        suffix = "" if strength is None else f"_steer-{strength:g}"
        written.append(write_results(out, stamp, suffix, results, rows))
    artifacts.wait_for_main()  # rank 0 wrote them (artifacts); every rank returns once they exist
    return written


def evaluate_cli(argv=None) -> int:
    config = parse_config(EvalConfig, argv, "sara eval", __doc__.split("\n\n")[0])
    for path in evaluate(config):
        summary = json.loads(path.read_text())
        scores = ", ".join(f"{lang} {m} {v[m]:.3f} (n={v['n']})" for lang, v in summary["per_language"].items()
                           for m in [next(m for m in summary["metrics"] if m in v)])
        print(f"{path}: {scores}")
    return 0
