"""Several routers per decoder layer (JetMoE): the router site.

JetMoE routes its attention heads (`self_attention.experts.router`) and its MLP experts
(`mlp.router`) with one `JetMoeTopKGating` each, and returns its dispatch grouped by expert
(slot order, token of each slot, weights, slots per expert) rather than per token. These tests
check, with their own hooks and arithmetic: the sites and the default (the MLP router), the
probe's regrouping of that dispatch, that the aligned distribution is the softmax of the chosen
router's logits, that `sara analyze` reports each site, that training at a site records it and
refuses priors of the other, and that a steering spec steers the site it was made at.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_train import config

from sara_moe import priors as P
from sara_moe.architectures import (
    NotAnMoEModelError,
    discover_routers,
    find_routers,
    router_site_names,
    set_router_site,
)
from sara_moe.architectures.probe import _grouped_dispatch
from sara_moe.architectures.tiny import build_tiny_model
from sara_moe.cli import main
from sara_moe.routing import RouterRecorder
from sara_moe.steering.steer import SteeringSpecError, build_spec, steering, validate_spec
from sara_moe.train import train

ATTENTION = "self_attention.experts.router"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("jetmoe")


def _jetmoe_output(experts: torch.Tensor, gates: torch.Tensor, num_experts: int):
    """What JetMoeTopKGating returns for a per-token selection, built as its forward builds it."""
    rows, k = experts.shape
    _, order = experts.flatten().sort(0)
    sizes = torch.bincount(experts.flatten(), minlength=num_experts).tolist()
    return order, order.div(k, rounding_mode="trunc"), gates.flatten()[order], sizes, torch.zeros(rows, num_experts)


def test_sites_default_and_choice():
    model = build_tiny_model("jetmoe", 300)
    assert router_site_names(model) == ["mlp.router", ATTENTION]
    default = discover_routers(model)
    assert [s.name for s in default] == [f"model.layers.{i}.mlp.router" for i in range(4)]
    assert {s.site for s in default} == {"mlp.router"} and default[0].logits_index == 4
    assert [s.name for s in find_routers(model, ATTENTION)] == [f"model.layers.{i}.{ATTENTION}" for i in range(4)]
    set_router_site(model, ATTENTION)
    assert {s.site for s in find_routers(model)} == {ATTENTION}
    assert {s.scoring for s in find_routers(model)} == {"softmax"}
    set_router_site(model, None)
    assert {s.site for s in find_routers(model)} == {"mlp.router"}
    with pytest.raises(NotAnMoEModelError, match=r"router_site 'mlp\.gate'.*\['mlp\.router', 'self_attention"):
        set_router_site(model, "mlp.gate")
    qwen = build_tiny_model("qwen3_moe", 300)
    assert router_site_names(qwen) == ["mlp.gate"]
    set_router_site(qwen, "mlp.gate")  # naming the only site is allowed
    assert len(find_routers(qwen)) == 4


def test_grouped_dispatch_is_regrouped_per_token():
    experts = torch.tensor([[1, 3], [0, 1], [3, 2], [1, 0]])
    gates = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.5, 0.5]])
    idx, weights = _grouped_dispatch(_jetmoe_output(experts, gates, 4), rows=4, num_experts=4)
    # per token the same (expert, weight) pairs, in whatever slot order
    for row in range(4):
        assert sorted(zip(idx[row].tolist(), weights[row].tolist())) == sorted(
            zip(experts[row].tolist(), gates[row].tolist()))
    order, tokens, slot_gates, sizes, logits = _jetmoe_output(experts, gates, 4)
    assert _grouped_dispatch((order, tokens, slot_gates, logits), 4, 4) is None  # no per-expert counts
    assert _grouped_dispatch((order, tokens, slot_gates, sizes[:3], logits), 4, 4) is None  # counts of 3 experts


def test_aligned_distribution_is_the_softmax_of_the_chosen_router(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = {}

    def keep(name):
        def hook(module, args):
            inputs[name] = args[0].detach()
        return hook

    layer = model.model.layers[2]
    handles = [layer.mlp.router.register_forward_pre_hook(keep("mlp.router")),
               layer.self_attention.experts.router.register_forward_pre_hook(keep(ATTENTION))]
    ids = torch.randint(4, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    got = {}
    for site in ("mlp.router", ATTENTION):
        set_router_site(model, site)
        with RouterRecorder(model) as recorder, torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        got[site] = recorder.probabilities(mask)[2].reshape(-1, 8)
    for handle in handles:
        handle.remove()
    mlp_logits = inputs["mlp.router"] @ layer.mlp.router.layer.weight.T
    attention_logits = inputs[ATTENTION] @ layer.self_attention.experts.router.layer.weight.T
    torch.testing.assert_close(got["mlp.router"], F.softmax(mlp_logits.float(), -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[ATTENTION], F.softmax(attention_logits.float(), -1), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got["mlp.router"], got[ATTENTION])


def test_analyze_reports_each_site(model_dir, example_corpus, tmp_path, capsys):
    out = tmp_path / "an"
    assert main(["analyze", "--model", str(model_dir), "--data", str(example_corpus), "--output-dir", str(out),
                 "--device", "cpu", "--no_hidden"]) == 0
    main_result = json.loads((out / "analysis.json").read_text())
    other = json.loads((out / "router_sites" / ATTENTION / "analysis.json").read_text())
    assert main_result["router_site"] == "mlp.router" and other["router_site"] == ATTENTION
    assert set(main_result["router_sites"]) == {"mlp.router", ATTENTION}
    assert main_result["router_sites"][ATTENTION]["folder"] == f"router_sites/{ATTENTION}"
    assert main_result["router_sites"][ATTENTION]["divergence_profile"] == other["divergence_profile"]
    assert main_result["router_sites"]["mlp.router"]["divergence_profile"] == main_result["divergence_profile"]
    assert main_result["divergence_profile"] != other["divergence_profile"]  # two routers, two profiles
    assert json.loads((out / "router_sites" / ATTENTION / "analyze_config.json").read_text())["router_site"] == ATTENTION
    # the other site's analysis is the one an analysis at that site writes
    alone = tmp_path / "alone"
    assert main(["analyze", "--model", str(model_dir), "--data", str(example_corpus), "--output-dir", str(alone),
                 "--device", "cpu", "--no_hidden", "--router_site", ATTENTION]) == 0
    at_site = json.loads((alone / "analysis.json").read_text())
    assert at_site["router_site"] == ATTENTION
    assert at_site["metrics"] == other["metrics"]
    assert set(at_site["router_sites"]) == {"mlp.router", ATTENTION}
    assert at_site["router_sites"]["mlp.router"]["divergence_profile"] == main_result["divergence_profile"]


def test_train_at_a_site_records_it_and_refuses_priors_of_the_other(model_dir, example_corpus, tmp_path):
    attention_priors = P.extract_priors(str(model_dir), example_corpus, tmp_path / "att.safetensors", batch_size=3,
                                        progress=False, router_site=ATTENTION)
    mlp_priors = P.extract_priors(str(model_dir), example_corpus, tmp_path / "mlp.safetensors", batch_size=3,
                                  progress=False)
    assert P.load_priors(attention_priors).fingerprint["router_site"] == ATTENTION
    assert not torch.equal(P.load_priors(attention_priors).table, P.load_priors(mlp_priors).table)
    js = {}
    for name, lam in (("sft", 0.0), ("sara", 5.0)):
        trainer = train(config(tmp_path / name, model_dir, example_corpus, attention_priors, lambda_js=lam,
                               max_steps=8, router_site=ATTENTION, align_layers=["0-3"]))
        run = json.loads((tmp_path / name / "run" / "sara_run.json").read_text())
        assert run["router_site"] == ATTENTION and run["scoring"]["rule"] == "softmax"
        logged = [entry["js_loss"] for entry in trainer.state.log_history if "js_loss" in entry]
        assert len(logged) == 8 and all(math.isfinite(v) and v > 0 for v in logged)
        js[name] = sum(logged[-3:]) / 3
    assert js["sara"] < js["sft"], js
    with pytest.raises(P.PriorsError, match="router_site"):
        train(config(tmp_path / "mixed", model_dir, example_corpus, mlp_priors, router_site=ATTENTION))
    assert not (tmp_path / "mixed").exists()


def test_steering_spec_steers_the_site_it_was_made_at(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    set_router_site(model, ATTENTION)
    spec = build_spec(model, {1: [3]})
    assert spec["router_site"] == ATTENTION
    set_router_site(model, None)  # the model's own site is the MLP router now; the spec still names its own
    logits = {}

    def keep(name):
        def hook(_module, _inputs, output):
            logits[name] = output[4].detach()
        return hook

    layer = model.model.layers[1]
    handles = [layer.mlp.router.register_forward_hook(keep("mlp")),
               layer.self_attention.experts.router.register_forward_hook(keep("attention"))]
    ids = torch.randint(4, 300, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), steering(model, validate_spec(spec, model), strength=50.0):
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    assert bool((logits["attention"].argmax(-1) == 3).all())
    assert not bool((logits["mlp"].argmax(-1) == 3).all())
    with pytest.raises(SteeringSpecError, match="router_site 'mlp.gate'"):
        validate_spec({**spec, "router_site": "mlp.gate"}, model)
