"""What each arm of the experiment trains with and how a model is scored (used by `experiment.run_arm`).

    from sara_moe.experiment.arms import control_table, evaluate_model, steered_scores
    table = control_table(cache.table, cache.ids, "shuffled", seed=0)   # the prior a control arm trains with
    scores = evaluate_model("runs/x/model", items)                      # {item key: 0/1}, cloze MC

Control arms keep SARA's loss and change its prior (`control_table`: own, shuffled, topic_shuffled,
mean; written beside the run by `write_control_priors`, ids, layers and fingerprint kept). Held-out
facts are scored cloze-style (`score_cloze`: the choice with the highest summed log-likelihood after
the question), which a model this small answers better than by letter. The `steer` arm scores a
fine-tuned model with the clone's items steered (`steered_scores`, Bandarkar et al.'s training-free
baseline), its experts per layer and strength chosen per run on the clone's dev items.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from sara_moe.experiment.design import CLONE
from sara_moe.runtime import artifacts

# the steer arm's grid, chosen per run on the clone's dev items (test never read): experts per layer x strength
STEER_GRID = [(top_k, strength) for top_k in (2, 4) for strength in (0.5, 1.0, 2.0, 4.0)]


# ----------------------------------------------------------------------------- priors of the control arms


def derangement(n: int, rng: random.Random) -> list[int]:
    """A permutation with no fixed point (every example gets another's prior); n >= 2."""
    if n < 2:
        raise ValueError(f"a shuffled prior needs at least 2 examples to exchange, got {n}")
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(i != p for i, p in enumerate(perm)):
            return perm


def control_table(table: torch.Tensor, ids: list, mode: str, seed: int) -> torch.Tensor:
    """The prior table an arm trains with: `own`, `shuffled` (derangement over all groups),
    `topic_shuffled` (derangement within each topic) or `mean` (every row the mean row)."""
    from sara_moe.testbed.build import instruct_topic

    if mode == "own":
        return table.clone()
    if mode == "mean":
        return table.mean(0, keepdim=True).expand_as(table).clone()
    rng = random.Random(f"{seed}:{mode}")
    source = list(range(len(ids)))
    if mode == "shuffled":
        blocks = [list(range(len(ids)))]
    elif mode == "topic_shuffled":
        by_topic: dict[str, list[int]] = {}
        for row, gid in enumerate(ids):
            by_topic.setdefault(instruct_topic(gid), []).append(row)
        blocks = [by_topic[t] for t in sorted(by_topic)]
    else:
        raise ValueError(f"prior mode {mode!r}: choose own, shuffled, topic_shuffled or mean")
    for rows in blocks:
        for row, take in zip(rows, derangement(len(rows), rng)):
            source[row] = rows[take]
    return table[source].clone()


def write_control_priors(priors_path: Path, mode: str, seed: int, output: Path) -> Path:
    """A copy of a priors file whose table is `control_table(...)`; ids, layers and fingerprint kept."""
    from safetensors import safe_open

    from sara_moe.priors import load_priors

    cache = load_priors(priors_path)
    with safe_open(str(priors_path), framework="pt") as fh:
        metadata = dict(fh.metadata())
    metadata["control"] = json.dumps({"mode": mode, "seed": seed})
    return artifacts.save_safetensors(output, {"priors": control_table(cache.table, cache.ids, mode, seed)}, metadata,
                                      overwrite=False)


def score_cloze(model, tokenizer, items, batch_size: int = 64) -> list[int]:
    """Per item 1 if the highest summed log-likelihood of a full answer after the prompt is the right one."""
    from sara_moe.evaluation.evaluate import loglikelihoods

    requests, spans = [], []
    for item in items:
        spans.append((len(requests), len(item.choices)))
        requests.extend((item.question + "\n", choice) for choice in item.choices)
    lls = loglikelihoods(model, tokenizer, requests, batch_size, desc="cloze mc")
    return [int(max(range(n), key=lambda k: lls[s + k]) == item.answer) for item, (s, n) in zip(items, spans)]


def evaluate_model(model_dir: Path, items: list[dict]) -> dict:
    from sara_moe.evaluation.evaluate import load_model

    model, tokenizer = load_model(str(model_dir), device="cpu")
    scores = score_cloze(model, tokenizer, [r["item"] for r in items])
    return {r["key"]: s for r, s in zip(items, scores)}


def knowledge_scores(model_dir: Path, items: list[dict]) -> dict:
    """Per English item, 1 if the model ranks the true fact highest *as pretraining wrote it*: the
    fact sentence alone, without the instruction template and the answer prefix the base model never
    saw. What the base model knows, apart from whether it can read a chat-style question (which is
    what fine-tuning teaches, and what the templated score of the base arm mixes in)."""
    from types import SimpleNamespace

    from sara_moe.evaluation.evaluate import load_model
    from sara_moe.testbed.world import ANSWER_PREFIX

    english = [r for r in items if r["lang"] == "en"]
    plain = [SimpleNamespace(question="", answer=r["item"].answer,
                             choices=[c.removeprefix(ANSWER_PREFIX).strip() for c in r["item"].choices]) for r in english]
    model, tokenizer = load_model(str(model_dir), device="cpu")
    return {r["key"]: s for r, s in zip(english, score_cloze(model, tokenizer, plain))}


def steered_scores(model_dir: Path, world: Path, layers: list, items: list[dict]) -> dict:
    """The steer arm (Bandarkar et al.'s training-free baseline) on a fine-tuned model: English items
    as they are; the clone's items with their routers steered toward the experts English instruction
    data uses most (`steer.identify` against a uniform baseline) on `layers`, at the (top_k, strength)
    of `STEER_GRID` with the best accuracy on the clone's dev items (ties: the first). Returns
    {scores, top_k, strength, dev_accuracy (per grid point)}."""
    from sara_moe.evaluation.evaluate import load_model
    from sara_moe.steering.steer import identify, steering

    model, tokenizer = load_model(str(model_dir), device="cpu")
    clone = [r for r in items if r["lang"] == CLONE]
    scores = {r["key"]: s for r, s in zip(items, score_cloze(model, tokenizer, [r["item"] for r in items]))}
    dev = [i for i, r in enumerate(clone) if r["part"] == "dev"]
    specs = {k: identify(model, tokenizer, world / "testbed" / "instruct.jsonl", layers=list(layers), top_k=k,
                         lang="en", progress=False) for k in dict.fromkeys(k for k, _ in STEER_GRID)}
    trials = {}
    for top_k, strength in STEER_GRID:
        with steering(model, specs[top_k], strength):
            trials[(top_k, strength)] = score_cloze(model, tokenizer, [r["item"] for r in clone])
    dev_acc = {key: sum(v[i] for i in dev) / max(len(dev), 1) for key, v in trials.items()}
    best = max(STEER_GRID, key=lambda key: dev_acc[key])  # max keeps the first of equals
    scores.update({r["key"]: s for r, s in zip(clone, trials[best])})
    return {"scores": scores, "top_k": best[0], "strength": best[1],
            "dev_accuracy": [{"top_k": k, "strength": st, "acc": dev_acc[(k, st)]} for k, st in STEER_GRID]}
