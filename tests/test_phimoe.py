"""Phi-3.5-MoE (phimoe): aligned as `softmax_aux`, verified through the model's own aux loss.

PhiMoE's sparsemixer weighs each selected expert by a softmax over a thresholded subset of the
logits, so its dispatch weights are no distribution over experts and no dispatch rule fits. The
distribution it treats as its routing is softmax(gate logits): its load-balancing loss reads it,
and in eval mode it dispatches that softmax's top-2. These tests check that identity on the
model with their own hooks and arithmetic, the refusals when it breaks, and that a tiny PhiMoE
runs through `sara analyze`, `sara priors`, `sara train` (cached and online anchors) and
`sara eval`, with SARA lowering its aligned-layer JS below SFT's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_analyze import _independent_pooled, _js
from test_priors import _pooled_by_hand
from test_train import config, expected_js

from sara_moe import priors as P
from sara_moe.analysis.analyze import analyze
from sara_moe.architectures import experts_per_token, expose_num_experts, find_routers, scoring_verdict
from sara_moe.architectures.probe import ScoringProbeError, aux_loss_by_hand, clear_scoring_cache
from sara_moe.architectures.tiny import build_tiny_model
from sara_moe.data.corpus import encode, read_corpus
from sara_moe.evaluation.evaluate import EvalConfig, evaluate
from sara_moe.routing import RouterRecorder
from sara_moe.train import build_trainer, train

MC_ITEMS = Path(__file__).resolve().parents[1] / "examples" / "eval_mc.jsonl"
EXPERTS = 8


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("phimoe")


@pytest.fixture(scope="module")
def priors_file(model_dir, example_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("phimoe_priors") / "priors.safetensors"
    return P.extract_priors(str(model_dir), example_corpus, out, batch_size=3, progress=False)


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _own_hooks(model):
    """Each router's logits and the expert indices/weights its experts module receives."""
    logits, dispatch, handles = {}, {}, []

    def read(name):
        def hook(_module, _inputs, output):
            logits.setdefault(name, output[0].detach())
        return hook

    def received(name):
        def hook(_module, args):
            dispatch.setdefault(name, args[1:])
        return hook

    for name, module in model.named_modules():
        if name.endswith("mlp.router"):
            handles.append(module.register_forward_hook(read(name)))
        if name.endswith("mlp.experts"):
            handles.append(module.register_forward_pre_hook(received(name[:-len("experts")] + "router")))
    return logits, dispatch, handles


def test_aux_loss_is_the_load_balancing_loss_of_the_softmax_and_the_dispatched_experts(model_dir):
    model = _load(model_dir)
    clear_scoring_cache()
    sites = find_routers(model)
    verdict = scoring_verdict(model, sites)
    assert {s.scoring for s in sites} == {"softmax_aux"} and [s.layer for s in sites] == [0, 1, 2, 3]
    assert "aux_loss" in verdict.evidence and verdict.max_error < 1e-5
    assert experts_per_token(model) == 2

    ids = torch.randint(4, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # a left-padded row: the model's loss weighs rows by the mask
    logits, dispatch, handles = _own_hooks(model)
    try:
        with RouterRecorder(model) as recorder, torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    probs = recorder.probabilities(mask)

    counts, prob_sum, rows = torch.zeros(EXPERTS), torch.zeros(EXPERTS), 0.0
    weight = mask.reshape(-1).float()
    for site, returned in zip(sites, out.router_logits):
        gate = logits[site.name]
        assert torch.equal(gate, returned)  # the slot sara-moe reads is what the loss reads
        idx, dispatched = dispatch[site.name]
        softmax = gate.softmax(-1)
        # eval mode: the dispatched experts are exactly the softmax's top-2
        assert torch.equal(idx.sort(-1).values, softmax.topk(2, -1).indices.sort(-1).values)
        # the aligned distribution is the softmax over all experts, pads zeroed
        torch.testing.assert_close(probs[site.layer], softmax.view(3, 10, -1) * mask[..., None], atol=1e-6, rtol=0)
        # ... and the dispatch weights are not its restriction: no dispatch rule could have found it
        picked = softmax.gather(1, idx)
        assert (picked / picked.sum(-1, keepdim=True) - dispatched / dispatched.sum(-1, keepdim=True)).abs().max() > 0.1
        counts += (F.one_hot(idx, EXPERTS).sum(1).float() * weight[:, None]).sum(0)
        prob_sum += (softmax * weight[:, None]).sum(0)
        rows += float(weight.sum())
    by_hand = EXPERTS * float(((counts / rows) * (prob_sum / rows)).sum())
    assert float(out.aux_loss) == pytest.approx(by_hand, rel=1e-5) and by_hand > 2.0  # 2.0 = perfectly balanced


def test_probe_recomputation_matches_a_written_out_switch_loss():
    logits = [torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]]), torch.tensor([[0.5, 0.5, -2.0], [1.0, -1.0, 0.0]])]
    picked = [torch.tensor([[0], [2]]), torch.tensor([[1], [0]])]
    p = [torch.softmax(x.double(), -1) for x in logits]
    share = [2 / 4, 1 / 4, 1 / 4]  # experts 0,2 in layer 0; 1,0 in layer 1
    mean_prob = [(p[0][:, e].sum() + p[1][:, e].sum()) / 4 for e in range(3)]
    want = 3 * sum(share[e] * mean_prob[e] for e in range(3))
    assert float(aux_loss_by_hand(logits, picked)) == pytest.approx(float(want), rel=1e-6)


def _refusal(model, pre_hook=None, output_hook=None):
    clear_scoring_cache()
    handles = [m.register_forward_pre_hook(pre_hook) for n, m in model.named_modules()
               if pre_hook and n.endswith("mlp.experts")]
    if output_hook:
        handles.append(model.register_forward_hook(output_hook))
    try:
        with pytest.raises(ScoringProbeError) as info:
            find_routers(model)
    finally:
        for handle in handles:
            handle.remove()
        clear_scoring_cache()
    return str(info.value)


def test_refused_when_the_dispatch_is_not_the_top_k_or_the_aux_loss_reads_something_else():
    model = build_tiny_model("phimoe", vocab_size=64)

    def bottom_two(_m, args):  # experts receive the two least likely experts instead
        hidden, index, weights = args
        return hidden, torch.full_like(index, 0) + torch.tensor([6, 7]), weights

    message = _refusal(model, pre_hook=bottom_two)
    assert "model_type='phimoe', router class PhimoeTopKRouter" in message and "not the top-k" in message
    assert "\n" not in message

    def other_loss(_m, _i, out):  # an aux loss that is not the load-balancing loss of the read logits
        if out.aux_loss is not None:
            out.aux_loss = out.aux_loss * 1.5
        return out

    message = _refusal(model, output_hook=other_loss)
    assert "is not the load-balancing loss" in message and "follow none of the rules" in message


def test_expose_num_experts_for_trl(model_dir):
    model = _load(model_dir)
    assert not hasattr(model.config, "num_experts")
    expose_num_experts(model)
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 2


def test_priors_and_analyze_read_the_softmax(model_dir, priors_file, example_corpus, tmp_path):
    from transformers import AutoTokenizer

    cache = P.load_priors(priors_file)
    model, tok = _load(model_dir), AutoTokenizer.from_pretrained(model_dir)
    groups = list(read_corpus(example_corpus))
    assert cache.layers == [0, 1, 2, 3] and cache.fingerprint["scoring"] == "softmax_aux"
    for row in (0, len(groups) - 1):
        ids, prompt_len = encode(groups[row].texts["en"], tok, 1024)
        torch.testing.assert_close(cache.table[row], _pooled_by_hand(model, ids, prompt_len, "all", False),
                                   atol=1e-5, rtol=0)

    strings = [g for g in groups if isinstance(g.texts["en"], str)]
    sub = tmp_path / "strings.jsonl"
    sub.write_text("".join(json.dumps({"id": g.id, "en": g.texts["en"], "sw": g.texts["sw"]}) + "\n" for g in strings))
    result = analyze(model_dir, sub, tmp_path / "a", batch_size=4)
    assert result["scoring"] == "softmax_aux" and result["moe_layers"] == [0, 1, 2, 3]
    pairs = [(_independent_pooled(model, tok, g.texts["sw"], False),
              _independent_pooled(model, tok, g.texts["en"], False)) for g in strings]
    for layer in range(4):
        want = sum(_js(s[layer], e[layer]) for s, e in pairs) / len(pairs)
        assert result["metrics"]["js_pair_mean"]["sw"][layer] == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert set(result["recommended_layers"]) <= {0, 1, 2, 3}


def _aligned_js(trainer, cache) -> float:
    """Mean aligned-layer JS to the priors over every training batch, eval mode, recomputed from router_logits."""
    model = trainer.model.eval()
    values = []
    for batch in trainer.get_train_dataloader():
        batch = trainer._prepare_inputs(batch)
        if bool(batch["sara_has_anchor"].any()):
            values.append(expected_js(model, batch, cache.table, cache.layers, trainer.align_layers, sigmoid=False))
    return sum(values) / len(values)


def test_sara_lowers_aligned_js_below_sft(model_dir, priors_file, example_corpus, tmp_path):
    cache = P.load_priors(priors_file)
    js = {}
    for name, lam in (("sft", 0.0), ("sara", 5.0)):
        trainer = train(config(tmp_path / name, model_dir, example_corpus, priors_file, lambda_js=lam, max_steps=8))
        assert trainer.align_layers == [1, 2]
        logged = [entry["js_loss"] for entry in trainer.state.log_history if "js_loss" in entry]
        assert len(logged) == 8 and all(math.isfinite(v) and v > 0 for v in logged)
        run = json.loads((tmp_path / name / "run" / "sara_run.json").read_text())
        assert run["scoring"]["rule"] == "softmax_aux"
        js[name] = _aligned_js(trainer, cache)
    assert js["sara"] < 0.8 * js["sft"], js


def test_online_anchor_training_and_eval_of_the_result(model_dir, example_corpus, tmp_path):
    trainer = train(config(tmp_path, model_dir, example_corpus, anchor_mode="online", lambda_js=1.0, max_steps=2))
    logged = [entry["js_loss"] for entry in trainer.state.log_history if "js_loss" in entry]
    assert len(logged) == 2 and all(math.isfinite(v) and v > 0 for v in logged)
    out = tmp_path / "run"
    [results_path] = evaluate(EvalConfig(model=str(out), data=str(MC_ITEMS), output_dir=str(tmp_path / "eval"),
                                         device="cpu", batch_size=4))
    results = json.loads(results_path.read_text())
    samples = [json.loads(line) for line in (tmp_path / "eval" / results["samples_file"]).read_text().splitlines()]
    for lang, entry in results["per_language"].items():
        mine = [s for s in samples if s["lang"] == lang]
        right = [max(range(len(s["loglikelihoods"])), key=s["loglikelihoods"].__getitem__) == s["answer"] for s in mine]
        assert entry["n"] == len(mine) == 5 and entry["acc"] == pytest.approx(sum(right) / len(right))


def test_cached_anchor_loss_matches_recomputation(model_dir, priors_file, example_corpus, tmp_path):
    trainer, _ = build_trainer(config(tmp_path, model_dir, example_corpus, priors_file, lambda_js=1.5))
    cache = P.load_priors(priors_file)
    model = trainer.model.eval()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    want = expected_js(model, batch, cache.table, cache.layers, [1, 2], sigmoid=False)
    with torch.no_grad():
        trainer.compute_loss(model, dict(batch))
    assert trainer._metrics["eval"]["js_loss"][-1] == pytest.approx(want, rel=1e-4) and want > 1e-4
