"""Deactivation: masked experts get no token and the rest are renormalised as the family does; zeroed neurons
change outputs only where they fire; `sara steer deactivate` and `sara eval --deactivate` end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from sara_moe.architectures import discover_routers
from sara_moe.architectures.tiny import TINY_ARCHS
from sara_moe.cli import main
from sara_moe.data.corpus import encode, read_corpus
from sara_moe.routing import RouterRecorder
from sara_moe.runtime.loading import load_model_and_tokenizer
from sara_moe.steering import deactivate as D
from sara_moe.steering.steer import SteeringSpecError


def _batch(tok, corpus, lang="en", n=4):
    seqs = [encode(g.texts[lang], tok, 64)[0] for g in list(read_corpus(corpus))[:n]]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


def _calls(module):
    """Record every call of `module` (its inputs and output) while the handle is alive."""
    seen = []
    handle = module.register_forward_hook(lambda m, a, kw, out: seen.append((a, kw, out)), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_a_masked_expert_receives_no_token(arch, tiny_model_dir, example_corpus):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir(arch)), "float32", "cpu")
    ids, mask = _batch(tok, example_corpus)
    layer = [s.layer for s in discover_routers(model)][-1]
    recorder = RouterRecorder(model, layers=[layer], keep_topk=True)
    with torch.no_grad(), recorder:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    before = recorder.topk[layer][1]
    busiest = int(torch.bincount(before.reshape(-1)).argmax())
    spec = D.build_deactivation(model, experts={layer: [busiest]})
    with torch.no_grad(), D.deactivation(model, spec), recorder:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    after = recorder.topk[layer][1]
    assert (before == busiest).any() and not (after == busiest).any()
    assert after.shape == before.shape  # still k experts per token


def test_the_others_are_renormalised_as_the_family_does(tiny_model_dir, example_corpus):
    for arch, normalise in (("qwen3_moe", True), ("olmoe", False)):  # norm_topk_prob on / off
        model, tok = load_model_and_tokenizer(str(tiny_model_dir(arch)), "float32", "cpu")
        assert bool(model.config.norm_topk_prob) is normalise
        ids, mask = _batch(tok, example_corpus)
        block = model.model.layers[1].mlp
        seen, handle = _calls(block.experts)
        with torch.no_grad(), D.deactivation(model, D.build_deactivation(model, experts={1: [2, 5]})):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        handle.remove()
        (hidden, index, weights), _kw, _out = seen[0]
        logits = hidden @ block.gate.weight.t()
        logits[:, [2, 5]] = -float("inf")
        probs = F.softmax(logits, dim=-1)  # the masked experts' share goes to the other six
        top = probs.topk(2, dim=-1)
        expected = top.values / top.values.sum(-1, keepdim=True) if normalise else top.values
        assert torch.equal(index, top.indices)
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
        assert not normalise or torch.allclose(weights.sum(-1), torch.ones(len(weights)))


def test_zeroing_neurons_changes_outputs_only_where_they_fire(tiny_model_dir, example_corpus):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir("qwen3_moe")), "float32", "cpu")
    ids, mask = _batch(tok, example_corpus)
    experts = model.model.layers[2].mlp.experts
    neurons = [1, 7, 30]
    seen, handle = _calls(experts)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        handle.remove()
        (hidden, index, weights), _kw, plain = seen[-1]
        with D.deactivation(model, D.build_deactivation(model, neurons=[(2, "routed", 4, neurons)])):
            seen, handle = _calls(experts)  # after the deactivation hook: sees what it returns
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            handle.remove()
    zeroed_in = seen[-1][0][0]
    torch.testing.assert_close(zeroed_in, hidden)  # earlier layers untouched: same input to layer 2
    zeroed = seen[-1][2]
    routed = (index == 4).any(-1)
    assert routed.any() and (~routed).any()
    assert torch.equal(zeroed[~routed], plain[~routed])  # tokens expert 4 never saw: bit for bit
    # where it fires: exactly what those neurons added, recomputed by hand from the weights
    x = hidden[routed]
    gate, up = (x @ experts.gate_up_proj[4].t()).chunk(2, dim=-1)
    act = (F.silu(gate) * up)[:, neurons]
    w = (weights * (index == 4))[routed].sum(-1, keepdim=True)
    expected = plain[routed] - w * (act @ experts.down_proj[4][:, neurons].t())
    torch.testing.assert_close(zeroed[routed], expected, rtol=1e-5, atol=1e-6)
    # and the whole model equals a copy whose down projection lost those columns
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.layers[2].mlp.experts.down_proj[4][:, neurons] = 0.0
        want = edited(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with D.deactivation(model, D.build_deactivation(model, neurons=[(2, "routed", 4, neurons)])):
            got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_zeroing_dense_and_shared_neurons_equals_editing_the_weights(tiny_model_dir, example_corpus):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir("deepseek_v2")), "float32", "cpu")
    ids, mask = _batch(tok, example_corpus)
    spec = D.build_deactivation(model, neurons=[(0, "dense", 0, [3, 4]), (1, "shared", 0, [0, 9])])
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.layers[0].mlp.down_proj.weight[:, [3, 4]] = 0.0
        edited.model.layers[1].mlp.shared_experts.down_proj.weight[:, [0, 9]] = 0.0
        want = edited(input_ids=ids, attention_mask=mask, use_cache=False).logits
        plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with D.deactivation(model, spec):
            got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        again = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain) and torch.equal(again, plain)  # hooks gone on exit


def test_zeroing_jetmoe_sorted_expert_neurons_equals_editing_the_weights(tiny_model_dir, example_corpus):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir("jetmoe")), "float32", "cpu")
    ids, mask = _batch(tok, example_corpus)
    spec = D.build_deactivation(model, neurons=[(1, "routed", 2, [0, 5]), (3, "routed", 7, [11])])
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.layers[1].mlp.output_linear.weight[2][:, [0, 5]] = 0.0  # [E, H, I]: those neurons' columns
        edited.model.layers[3].mlp.output_linear.weight[7][:, [11]] = 0.0
        want = edited(input_ids=ids, attention_mask=mask, use_cache=False).logits
        plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with D.deactivation(model, spec):
            got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain)


def test_specs_that_do_not_fit_are_refused(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir("qwen3_moe")), "float32", "cpu")
    with pytest.raises(SteeringSpecError, match="leaves fewer than the 2"):
        D.build_deactivation(model, experts={1: list(range(7))})
    with pytest.raises(SteeringSpecError, match="neuron ids must be in 0..31"):
        D.build_deactivation(model, neurons=[(1, "routed", 0, [32])])
    with pytest.raises(SteeringSpecError, match="no dense MLP at layer 0"):
        D.build_deactivation(model, neurons=[(0, "dense", 0, [1])])
    other, _ = load_model_and_tokenizer(str(tiny_model_dir("mixtral")), "float32", "cpu")
    with pytest.raises(SteeringSpecError, match="fingerprint does not match"):
        D.validate_deactivation(D.build_deactivation(model, experts={1: [0]}), other)


def test_steer_deactivate_and_eval_end_to_end(tiny_model_dir, example_corpus, tmp_path, capsys):
    model_dir = tiny_model_dir("qwen3_moe")
    spec_path = tmp_path / "off.json"
    assert main(["steer", "deactivate", "--model", str(model_dir), "--experts", "1:0,3", "2:5",
                 "--output", str(spec_path)]) == 0
    spec = json.loads(spec_path.read_text())
    assert spec["format"] == D.FORMAT and spec["experts"] == [{"layer": 1, "experts": [0, 3]},
                                                              {"layer": 2, "experts": [5]}]
    assert json.loads((tmp_path / "off.json.config.json").read_text())["experts"] == ["1:0", "3", "2:5"]  # as the list parser splits it
    assert main(["steer", "deactivate", "--model", str(model_dir), "--experts", "1:0", "--output", str(spec_path)]) == 1
    assert "exists" in capsys.readouterr().err
    data = example_corpus.parent / "eval_mc.jsonl"
    runs = {}
    for name, extra in (("plain", []), ("off", ["--deactivate", str(spec_path)])):
        assert main(["eval", "--model", str(model_dir), "--data", str(data), "--output_dir", str(tmp_path / name),
                     "--device", "cpu", *extra]) == 0
        results = json.loads(next((tmp_path / name).glob("results_*.json")).read_text())
        samples = [json.loads(line) for line in (tmp_path / name / results["samples_file"]).read_text().splitlines()]
        runs[name] = (results, samples)
    assert runs["plain"][0]["deactivate"] is None
    assert runs["off"][0]["deactivate"] == {"spec": str(spec_path), "source": {"rule": "hand-made"}, "experts": 3,
                                            "neurons": 0}
    # masking three experts changes the log-likelihoods the items are scored by
    ll = {name: [row["loglikelihoods"] for row in samples] for name, (_r, samples) in runs.items()}
    assert ll["plain"] != ll["off"]
    # a spec for another model is refused before anything is written
    other = tmp_path / "other_eval"
    assert main(["eval", "--model", str(tiny_model_dir("mixtral")), "--data", str(data), "--output_dir", str(other),
                 "--device", "cpu", "--deactivate", str(spec_path)]) == 1
    assert not other.exists()


def test_steer_deactivate_reads_neurons_json(tmp_path, tiny_model_dir, example_corpus):
    from sara_moe.analysis.neurons import NeuronsConfig, neurons

    model_dir = tiny_model_dir("qwen3_moe")
    result = neurons(NeuronsConfig(model=str(model_dir), data=str(example_corpus), output_dir=str(tmp_path / "n"),
                                   device="cpu", lnp_top_rate=0.2))
    lists = result["classification"]["lnp"]["neurons"]["sw"]["specific"]
    assert lists, "a 20% LNP share finds Swahili-specific neurons in the tiny model"
    assert main(["steer", "deactivate", "--model", str(model_dir), "--source", str(tmp_path / "n" / "neurons.json"),
                 "--langs", "sw", "--output", str(tmp_path / "off.json")]) == 0
    spec = json.loads((tmp_path / "off.json").read_text())
    zeroed = sorted([e["layer"], e["kind"], e["expert"], n] for e in spec["neurons"] for n in e["neurons"])
    assert zeroed == sorted(lists)
    assert spec["source"]["langs"] == ["sw"] and spec["source"]["method"] == "lnp"
