"""`sara neurons`: counts equal a recomputation from the weights; planted neurons are found; LNP/LAPE rules."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

from sara_moe.analysis import neuron_classes as C
from sara_moe.analysis.neurons import NeuronsConfig, neurons
from sara_moe.architectures import discover_routers
from sara_moe.architectures.tiny import TINY_ARCHS, build_tiny_model, build_tokenizer
from sara_moe.cli import main
from sara_moe.data.corpus import encode, read_corpus, render_plain
from sara_moe.runtime.loading import load_model_and_tokenizer


def _run(model_dir, corpus, out, **kw):
    return neurons(NeuronsConfig(model=str(model_dir), data=str(corpus), output_dir=str(out), device="cpu", **kw))


def _tensors(out):
    with safe_open(str(out / "neurons.safetensors"), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


# ----------------------------------------------------------------------------- counts


def _route(arch, block, x):
    """Top-k experts of each row of `x` from the router weights, as each family's router picks them."""
    if arch == "gpt_oss":
        logits = x @ block.router.weight.t() + block.router.bias
        return logits.topk(2, dim=-1).indices
    if arch == "jetmoe":
        return (x @ block.router.layer.weight.t()).topk(2, dim=-1).indices
    return F.softmax(x @ block.gate.weight.t(), dim=-1).topk(2, dim=-1).indices  # qwen3_moe, deepseek_v2 greedy


def _fires(arch, experts, x, e):
    if arch == "jetmoe":  # the block: input_linear [E, 2I, H], gate half first
        half = experts.input_linear.weight.shape[1] // 2
        return F.silu(x @ experts.input_linear.weight[e][:half].t()) > 0
    if arch == "gpt_oss":  # stored [H, 2I], gate and up interleaved, with a bias
        pre = x @ experts.gate_up_proj[e][:, 0::2] + experts.gate_up_proj_bias[e][0::2]
        return pre.clamp(max=experts.limit) * torch.sigmoid(pre.clamp(max=experts.limit) * experts.alpha) > 0
    half = experts.gate_up_proj.shape[1] // 2
    return F.silu(x @ experts.gate_up_proj[e][:half].t()) > 0


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v2", "jetmoe"])
def test_counts_equal_a_recomputation_from_the_weights(arch, tiny_model_dir, example_corpus, tmp_path):
    out = tmp_path / "n"
    result = _run(tiny_model_dir(arch), example_corpus, out, batch_size=4)
    tensors, meta = _tensors(out)
    langs = json.loads(meta["langs"])
    assert langs == result["langs"] == ["en", "sw", "es"]
    model, tok = load_model_and_tokenizer(str(tiny_model_dir(arch)), "float32", "cpu")
    layers = model.model.layers
    moe = [s.layer for s in discover_routers(model)]
    inputs: dict[int, list] = {}  # decoder layer -> MLP inputs of the current text, one text at a time (no padding)
    handles = [layers[i].mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0][0]))
               for i in range(len(layers))]
    num_experts = 8
    act = torch.zeros(len(moe), num_experts, tensors["act_count"].shape[2], len(langs), dtype=torch.int64)
    tokens = torch.zeros(len(moe), num_experts, len(langs), dtype=torch.int64)
    dense = {i: torch.zeros(layers[i].mlp.gate_proj.out_features, len(langs), dtype=torch.int64)
             for i in range(len(layers)) if i not in moe}
    shared = {i: torch.zeros(layers[i].mlp.shared_experts.gate_proj.out_features, len(langs), dtype=torch.int64)
              for i in moe if hasattr(layers[i].mlp, "shared_experts")}
    with torch.no_grad():
        for group in read_corpus(example_corpus):
            for li, lang in enumerate(langs):
                inputs.clear()
                model(input_ids=torch.tensor([encode(group.texts[lang], tok, 512)[0]]), use_cache=False)
                for pos, layer in enumerate(moe):
                    block, x = layers[layer].mlp, inputs[layer][0]
                    chosen = _route(arch, block, x)
                    for e in range(num_experts):
                        rows = (chosen == e).any(-1)
                        tokens[pos, e, li] += int(rows.sum())
                        act[pos, e, :, li] += _fires(arch, block if arch == "jetmoe" else block.experts, x[rows], e).sum(0)
                    if layer in shared:
                        shared[layer][:, li] += (F.silu(block.shared_experts.gate_proj(x)) > 0).sum(0)
                for layer in dense:
                    dense[layer][:, li] += (F.silu(layers[layer].mlp.gate_proj(inputs[layer][0])) > 0).sum(0)
    for h in handles:
        h.remove()
    assert torch.equal(tensors["token_count"], tokens)
    assert torch.equal(tensors["act_count"], act)
    assert tokens.sum((1, 2)).tolist() == [2 * sum(result["tokens"].values())] * len(moe)  # two experts per token
    for layer, counts in dense.items():
        assert torch.equal(tensors[f"dense.layer_{layer}.act_count"], counts)
        assert tensors[f"dense.layer_{layer}.token_count"].tolist() == [result["tokens"][x] for x in langs]
    for layer, counts in shared.items():
        assert torch.equal(tensors[f"shared.layer_{layer}.act_count"], counts)
    assert json.loads(meta["moe_layers"]) == moe == result["moe_layers"]
    for name in ("neurons.json", "neurons_config.json", "neurons_map.png"):
        assert (out / name).is_file()
    assert json.loads((out / "neurons_config.json").read_text())["batch_size"] == 4


# ----------------------------------------------------------------------------- a planted neuron


def _planted_model(tmp_path, corpus, english_too: bool = False, name: str = "planted", writes: bool = False):
    """A tiny Qwen3-MoE whose residual stream is the embedding (attention and experts write nothing) and
    where only neuron 5 of expert 3 at layer 2 fires, on exactly the tokens that occur in Swahili texts only
    (with `english_too`, neuron 7 there fires on the English-only tokens as well; with `writes`, neuron 5
    writes into the residual stream, away from the three planted directions)."""
    groups = list(read_corpus(corpus))
    texts = {lang: [g.texts[lang] for g in groups] for lang in ("en", "sw", "es")}
    tok = build_tokenizer([render_plain(t) for v in texts.values() for t in v], vocab_size=600)
    ids = {lang: {i for t in v for i in encode(t, tok)[0]} for lang, v in texts.items()}  # the ids neurons sees
    sw_only = sorted(ids["sw"] - ids["en"] - ids["es"])
    model = build_tiny_model("qwen3_moe", vocab_size=len(tok), seed=0)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0], emb[:, 1] = -1.0, 1.0
        emb[sw_only, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            half = layer.mlp.experts.gate_up_proj.shape[1] // 2
            layer.mlp.experts.gate_up_proj[:, :half] = 0.0
            layer.mlp.experts.gate_up_proj[:, :half, 1] = -5.0  # dim 1 is +1 on every token: never fires
        layer = model.model.layers[2]
        layer.mlp.experts.gate_up_proj[3, 5, :] = 0.0
        layer.mlp.experts.gate_up_proj[3, 5, 0] = 5.0  # fires iff dim 0 is +1: a Swahili-only token
        layer.mlp.gate.weight[3, 1] = 50.0  # expert 3 gets every token
        if writes:
            column = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
            column[:3] = 0.0
            layer.mlp.experts.down_proj[3, :, 5] = column
        if english_too:
            emb[:, 2] = -1.0
            emb[sorted(ids["en"] - ids["sw"] - ids["es"]), 2] = 1.0
            layer.mlp.experts.gate_up_proj[3, 7, :] = 0.0
            layer.mlp.experts.gate_up_proj[3, 7, 2] = 5.0
    model.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    sw_ids = [i for t in texts["sw"] for i in encode(t, tok)[0]]
    return tmp_path / name, sum(i in set(sw_only) for i in sw_ids), len(sw_ids)


def test_a_planted_neuron_is_specific_to_its_language(tmp_path, example_corpus):
    model_dir, sw_only, sw_tokens = _planted_model(tmp_path, example_corpus)
    assert sw_only > 10
    result = _run(model_dir, example_corpus, tmp_path / "n", ablate=True)
    tensors, _ = _tensors(tmp_path / "n")
    probs = tensors["act_count"][2, 3, 5].double() / tensors["token_count"][2, 3].double()
    assert probs[0] == 0 and probs[2] == 0 and probs[1] == sw_only / sw_tokens  # Swahili-only tokens, not <s> or "."
    assert int(tensors["act_count"].sum()) == int(tensors["act_count"][2, 3, 5, 1])
    for method in ("lnp", "lape"):
        found = result["classification"][method]["neurons"]
        assert found["sw"]["specific"] == [[2, "routed", 3, 5]], method
        assert found["en"]["specific"] == found["es"]["specific"] == [], method
        assert result["classification"][method]["counts"]["routed"]["specific"][2][3] == [0, 1, 0]
    assert result["classification"]["lnp"]["specific_share"][2][3] == [0.0, 1 / 32, 0.0]
    # the experts write nothing, so zeroing the neuron changes no perplexity: the table has its row, ratio 1
    row = result["ablation"]["rows"]["sw"]
    assert row["neurons"] == 1 and all(math.isclose(r, 1.0, rel_tol=1e-6) for r in row["ratio"].values())
    assert result["ablation"]["rows"]["en"]["ppl"] is None
    saved = json.loads((tmp_path / "n" / "neurons.json").read_text())
    assert saved["classification"]["lnp"]["totals"]["sw"]["specific"] == 1


def test_zeroing_a_languages_specific_neurons_raises_its_perplexity_only(tmp_path, example_corpus):
    model_dir = _planted_model(tmp_path, example_corpus, writes=True)[0]
    result = _run(model_dir, example_corpus, tmp_path / "n", ablate=True)
    assert result["classification"]["lnp"]["neurons"]["sw"]["specific"] == [[2, "routed", 3, 5]]
    ratio = result["ablation"]["rows"]["sw"]["ratio"]
    # the neuron writes only on Swahili-only tokens; elsewhere its SiLU is ~1e-8 of nothing
    assert abs(ratio["sw"] - 1) > 1e-3
    assert abs(ratio["en"] - 1) < 1e-5 and abs(ratio["es"] - 1) < 1e-5
    assert abs(ratio["sw"] - 1) > 100 * max(abs(ratio["en"] - 1), abs(ratio["es"] - 1))
    base = result["ablation"]["base"]
    assert result["ablation"]["rows"]["sw"]["ppl"]["sw"] == pytest.approx(ratio["sw"] * base["sw"])


def test_compare_counts_the_change_per_band_and_the_overlaps(tmp_path, example_corpus, capsys):
    base_dir = _planted_model(tmp_path, example_corpus)[0]
    run_dir = _planted_model(tmp_path, example_corpus, english_too=True, name="run")[0]
    _run(base_dir, example_corpus, tmp_path / "base")
    _run(run_dir, example_corpus, tmp_path / "sft")
    assert main(["neurons", "--compare", str(tmp_path / "base"), str(tmp_path / "sft"), "--output_dir",
                 str(tmp_path / "cmp")]) == 0
    assert "sft: LNP language-specific neurons vs base en +1, sw +0, es +0" in capsys.readouterr().out
    found = json.loads((tmp_path / "cmp" / "neurons_compare.json").read_text())
    # 4 decoder layers: the paper's band 7/48 <= i/4 < 35/48 is layers 1-2
    assert found["bands"] == {"early": [0], "middle": [1, 2], "late": [3]}
    lnp = found["methods"]["lnp"]
    assert lnp["base"]["counts"]["specific"]["middle"] == {"en": 0, "sw": 1, "es": 0}
    run = lnp["runs"]["sft"]
    assert run["counts"]["specific"]["middle"] == {"en": 1, "sw": 1, "es": 0}
    assert run["delta"]["specific"] == {"early": {"en": 0, "sw": 0, "es": 0}, "middle": {"en": 1, "sw": 0, "es": 0},
                                        "late": {"en": 0, "sw": 0, "es": 0}}
    assert run["kept_specific"] == {"en": 0.0, "sw": 1.0, "es": None}
    assert run["overlap_with_anchor"] == {"en": 1.0, "sw": 0.0, "es": None}
    assert json.loads((tmp_path / "cmp" / "neurons_compare_config.json").read_text())["compare"] == [
        str(tmp_path / "base"), str(tmp_path / "sft")]
    assert main(["neurons", "--compare", str(tmp_path / "base"), "--output_dir", str(tmp_path / "cmp2")]) == 1


# ----------------------------------------------------------------------------- the rules


def test_lnp_and_lape_follow_the_papers_rules():
    # 100 neurons x 3 languages: 95 never fire; the last five are hand-made
    probs = torch.zeros(100, 3, dtype=torch.float64)
    probs[95] = torch.tensor([0.9, 0.0, 0.0])   # one language
    probs[96] = torch.tensor([0.8, 0.7, 0.0])   # two of three
    probs[97] = torch.tensor([0.6, 0.6, 0.6])   # all three
    probs[98] = torch.tensor([0.9, 0.9, 0.01])  # two, a third barely
    probs[99] = torch.tensor([0.02, 0.0, 0.0])  # one language, but below every bar
    t = C.Thresholds(lape_top_rate=0.05, lnp_top_rate=0.05)
    found = C.classify(probs, ["en", "sw", "es"], t)
    flat = probs.reshape(-1).sort().values
    bar = float(flat[round(300 * 0.95) - 1])  # kthvalue(round(n * 0.95)), 1-based
    assert found["lnp"]["bars"]["activation"] == bar == 0.0  # 95% of the values are zero
    # LNP: score = H(p/sum)/log 3, an all-zero row counting as uniform (1.0); the 5 lowest are 95 and 99 (0),
    # 96 (0.629), 98 (0.659), then neuron 0 (1.0, ties by index): 97 (1.0) is no language neuron
    h = lambda p: -sum(x * math.log(x) for x in (torch.tensor(p) / sum(p)).tolist() if x > 0) / math.log(3)
    assert 0 < h([0.8, 0.7, 0.0]) < h([0.9, 0.9, 0.01]) < h([0.6, 0.6, 0.6]) == pytest.approx(1.0)
    types = found["lnp"]["type"].tolist()
    assert types[95] == 1 and types[99] == 1  # specific (above the 0 bar for one language)
    assert types[96] == 2 and types[98] == 3  # 98: a language neuron above the bar for all three: agnostic
    assert types[97] == 3 and set(types[:95]) == {0}  # 97: not kept, above the bar everywhere: agnostic
    # LAPE: filter keeps neurons with a probability above the 95% quantile (0): 95..99; lowest entropy 5 of them
    lape = found["lape"]["type"].tolist()
    assert lape[95] == lape[99] == 1 and lape[96] == 2 and lape[97] == lape[98] == 3 and set(lape[:95]) == {0}
    counts = C.type_counts(found["lnp"]["type"], found["lnp"]["langs"], (1, 1))
    assert counts["specific"].tolist() == [[[2, 0, 0]]] and counts["related"].tolist() == [[[1, 1, 0]]]
    assert counts["agnostic"].tolist() == [[[2, 2, 2]]]


# ----------------------------------------------------------------------------- every family


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_every_tiny_family_is_read(arch, tiny_model_dir, example_corpus, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.delenv("SARA_DEBUG", raising=False)
    out, model_dir = tmp_path / "n", tiny_model_dir(arch)
    capsys.readouterr()
    hf_logging = transformers.utils.logging
    hf_logging.disable_progress_bar()  # weight loading's bar is progress, not the error
    try:
        rc = main(["neurons", "--model", str(model_dir), "--data", str(example_corpus), "--output_dir", str(out),
                   "--device", "cpu"])
    finally:
        hf_logging.enable_progress_bar()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0, err  # every tiny family is read: fused experts, and JetMoE's sorted ones
    result = json.loads((out / "neurons.json").read_text())
    assert result["moe_layers"] == [s["layer"] for s in result["sites"] if s["kind"] == "routed"]
    tensors, _ = _tensors(out)
    k = TINY_ARCHS[arch][2].get("num_experts_per_tok", 2)
    per_layer = tensors["token_count"].sum((1, 2))
    assert per_layer.tolist() == [k * sum(result["tokens"].values())] * len(result["moe_layers"])
    assert (tensors["act_count"] <= tensors["token_count"].unsqueeze(2)).all()


def test_every_experts_implementation_is_read_and_zeroed_alike(tiny_model_dir, example_corpus):
    from sara_moe.analysis.neurons import NeuronCounter
    from sara_moe.runtime.loading import pad_batch
    from sara_moe.steering import deactivate as D

    seen = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):  # transformers 5's experts kernels: one hook reads them all
        model, tok = load_model_and_tokenizer(str(tiny_model_dir("qwen3_moe")), "float32", "cpu")
        model.set_experts_implementation(impl)
        assert model.config._experts_implementation == impl
        seqs = [encode(g.texts["sw"], tok, 64)[0] for g in read_corpus(example_corpus)][:6]
        counter = NeuronCounter(model, ["sw"])
        with counter, torch.no_grad():
            counter.count(tok, seqs, 0)
        ids, mask = pad_batch(tok, seqs, side="right")
        spec = D.build_deactivation(model, experts={1: [0]}, neurons=[(2, "routed", 4, [1, 7, 30])])
        with torch.no_grad(), D.deactivation(model, spec):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        seen[impl] = (counter.act, logits)
    for impl, (act, logits) in seen.items():
        assert torch.equal(act, seen["eager"][0]), impl
        torch.testing.assert_close(logits, seen["eager"][1], rtol=1e-5, atol=1e-5)


def test_experts_it_cannot_read_are_refused_in_one_line(tiny_model_dir):
    from torch import nn

    from sara_moe.architectures.experts import mlp_sites

    model, _ = load_model_and_tokenizer(str(tiny_model_dir("qwen3_moe")), "float32", "cpu")

    class LoopExperts(nn.ModuleList):  # per-expert modules without the fused layout
        pass

    model.model.layers[2].mlp.experts = LoopExperts([nn.Linear(32, 32) for _ in range(8)])
    with pytest.raises(ValueError) as err:
        mlp_sites(model)
    message = str(err.value)
    assert "\n" not in message and str(tiny_model_dir("qwen3_moe")) in message and "LoopExperts" in message
