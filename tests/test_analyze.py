"""`sara analyze` values against an independent recomputation, on every family, and its errors."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sara_moe.analysis.analyze import analyze
from sara_moe.architectures.tiny import TINY_ARCHS
from sara_moe.cli import main as sara
from sara_moe.data.corpus import read_corpus


def _js(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda x, y: sum(a * math.log(max(a, 1e-8) / max(b, 1e-8)) for a, b in zip(x, y) if a > 0)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def _independent_pooled(model, tokenizer, text, sigmoid, dispatched=False):
    """Pooled distribution per MoE layer from `output_router_logits` of an unbatched forward.

    `dispatched`: Bandarkar et al.'s routing weights — each token's top-k scores renormalised to 1.
    """
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    pooled = []
    for layer_logits in logits:
        x = layer_logits.double()
        probs = torch.sigmoid(x) / torch.sigmoid(x).sum(-1, keepdim=True) if sigmoid else torch.softmax(x, -1)
        if dispatched:
            top = probs.topk(model.config.num_experts_per_tok, dim=-1)
            probs = torch.zeros_like(probs).scatter_(-1, top.indices, top.values)
            probs = probs / probs.sum(-1, keepdim=True)
        pooled.append(probs.mean(0).tolist())
    return pooled


def _entropy(p):
    return -sum(a * math.log(a) for a in p if a > 0)


@pytest.mark.parametrize("arch,sigmoid", [("qwen3_moe", False), ("deepseek_v3", True)])
def test_analyze_matches_independent_recomputation(tiny_model_dir, example_corpus, tmp_path, arch, sigmoid):
    model_dir = tiny_model_dir(arch)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # batched + left-padded must equal unbatched
    tokenizer.save_pretrained(model_dir)
    result = analyze(model_dir, example_corpus, tmp_path / "a", langs=["sw"], batch_size=3)
    saved = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert saved == json.loads(json.dumps(result))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    strings = [g for g in read_corpus(example_corpus) if isinstance(g.texts["en"], str)]
    groups = list(read_corpus(example_corpus))
    assert result["num_examples"] == len(groups) and result["num_pairs"] == {"sw": len(groups)}
    assert result["moe_layers"] == ([1, 2, 3] if arch == "deepseek_v3" else [0, 1, 2, 3])
    assert result["paper_band"] == [1, 2] and "js_norm" not in result["metrics"]

    # Recompute on the plain-string groups only and compare with an analysis of those alone.
    sub = tmp_path / "strings.jsonl"
    sub.write_text("".join(json.dumps({"id": g.id, "en": g.texts["en"], "sw": g.texts["sw"]}) + "\n" for g in strings))
    result = analyze(model_dir, sub, tmp_path / "b", batch_size=4)
    pairs = [(_independent_pooled(model, tokenizer, g.texts["sw"], sigmoid),
              _independent_pooled(model, tokenizer, g.texts["en"], sigmoid)) for g in strings]
    n_layers = len(result["moe_layers"])
    for i in range(n_layers):
        js_pair = sum(_js(s[i], e[i]) for s, e in pairs) / len(pairs)
        assert result["metrics"]["js_pair_mean"]["sw"][i] == pytest.approx(js_pair, rel=1e-4, abs=1e-7)
        # Bandarkar et al.: normalise each pair by its own headroom, then average over pairs
        norm = sum(_js(s[i], e[i]) / max(math.log(8) - (_entropy(s[i]) + _entropy(e[i])) / 2, 1e-6)
                   for s, e in pairs) / len(pairs)
        assert result["metrics"]["js_pair_norm"]["sw"][i] == pytest.approx(norm, rel=1e-3, abs=1e-6)
        mean_s = [sum(s[i][e] for s, _ in pairs) / len(pairs) for e in range(8)]
        mean_e = [sum(en[i][e] for _, en in pairs) / len(pairs) for e in range(8)]
        assert result["metrics"]["js_corpus"]["sw"][i] == pytest.approx(_js(mean_s, mean_e), rel=1e-4, abs=1e-7)
        entropy = sum(_entropy(s[i]) for s, _ in pairs) / len(pairs)
        assert result["metrics"]["routing_entropy"]["sw"][i] == pytest.approx(entropy, rel=1e-4)
        top = lambda p: set(sorted(range(8), key=lambda e: -p[e])[:2])
        overlap = sum(len(top(s[i]) & top(e[i])) / len(top(s[i]) | top(e[i])) for s, e in pairs) / len(pairs)
        assert result["metrics"]["topk_overlap"]["sw"][i] == pytest.approx(overlap, abs=1e-6)
    assert result["all_pairs_js"]["js_pair_mean"][0][1][0] == result["metrics"]["js_pair_mean"]["sw"][0]


def test_dispatched_routing_and_hidden_alignment_match_independent_recomputation(tiny_model_dir, example_corpus,
                                                                                tmp_path):
    model_dir = tiny_model_dir("qwen3_moe")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    strings = [g for g in read_corpus(example_corpus) if isinstance(g.texts["en"], str)][:6]
    sub = tmp_path / "strings.jsonl"
    sub.write_text("".join(json.dumps({"id": g.id, "en": g.texts["en"], "sw": g.texts["sw"]}) + "\n" for g in strings))
    result = analyze(model_dir, sub, tmp_path / "d", routing="dispatched", batch_size=len(strings))
    pairs = [(_independent_pooled(model, tokenizer, g.texts["sw"], False, dispatched=True),
              _independent_pooled(model, tokenizer, g.texts["en"], False, dispatched=True)) for g in strings]
    for i in range(4):
        js_pair = sum(_js(s[i], e[i]) for s, e in pairs) / len(pairs)
        assert result["metrics"]["js_pair_mean"]["sw"][i] == pytest.approx(js_pair, rel=1e-4, abs=1e-7)
    assert result["routing"] == "dispatched"

    # MEXA over one pool (batch = every group): position-weighted means, diagonal beats row and column
    def embed(text):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
        n = ids.shape[1]
        weights = torch.arange(1, n + 1, dtype=torch.float64) / sum(range(1, n + 1))
        return [(weights[:, None] * h[0].double()).sum(0) for h in states[1:]], [h[0].double().mean(0) for h in states[1:]]

    sw = [embed(g.texts["sw"]) for g in strings]
    en = [embed(g.texts["en"]) for g in strings]
    cos = torch.nn.functional.cosine_similarity
    for layer in range(4):
        sim = [[float(cos(sw[a][0][layer], en[b][0][layer], dim=0)) for b in range(6)] for a in range(6)]
        hits = sum(all(sim[a][a] > sim[a][b] and sim[a][a] > sim[b][a] for b in range(6) if b != a) for a in range(6))
        assert result["hidden_alignment"]["mexa"]["sw"][layer] == pytest.approx(hits / 6)
        mean_cos = sum(float(cos(sw[a][1][layer], en[a][1][layer], dim=0)) for a in range(6)) / 6
        assert result["hidden_alignment"]["cosine"]["sw"][layer] == pytest.approx(mean_cos, rel=1e-4)
    counts = torch.tensor(result["experts"]["counts"])  # [langs, layers, experts]: k slots per real token
    assert counts.sum(-1).tolist() == [[2 * t] * 4 for t in result["experts"]["tokens"]]


def test_instruction_values_are_pooled_with_the_eos_training_appends(tiny_model_dir, tmp_path):
    """One pooling definition: analyze renders instruction values as priors and train do (plain template + EOS)."""
    from sara_moe.priors import extract_priors, load_priors

    model_dir = tiny_model_dir("qwen3_moe")
    data = tmp_path / "inst.jsonl"
    data.write_text(json.dumps({"id": "g1", "en": {"prompt": "Say hi.", "response": "Hi."},
                                "sw": {"prompt": "Sema jambo.", "response": "Jambo."}}) + "\n")
    result = analyze(model_dir, data, tmp_path / "a", hidden=False)
    extract_priors(model_dir, data, tmp_path / "p.safetensors", progress=False)
    prior = load_priors(tmp_path / "p.safetensors").table[0]  # [layers, experts] of the anchor
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert not getattr(tokenizer, "chat_template", None)  # so the plain template + EOS path is the one tested
    entropy = [_entropy(row) for row in prior.tolist()]
    assert result["routing_entropy"]["en"] == pytest.approx(entropy, rel=1e-5)


def test_device_map_auto_gives_the_same_analysis(tiny_model_dir, example_corpus, tmp_path):
    model_dir = tiny_model_dir("olmoe")
    plain = analyze(model_dir, example_corpus, tmp_path / "a", langs=["es"], progress=False)
    mapped = analyze(model_dir, example_corpus, tmp_path / "b", langs=["es"], device_map="auto", progress=False)
    assert mapped["metrics"] == plain["metrics"]


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_sara_analyze_cli_runs_on_every_family(tiny_model_dir, example_corpus, tmp_path, arch):
    out = tmp_path / "out"
    assert sara(["analyze", "--model", str(tiny_model_dir(arch)), "--data", str(example_corpus),
                 "--output-dir", str(out), "--batch-size", "5"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert sorted(result["metrics"]["js_pair_mean"]) == ["es", "sw"]
    assert result["scoring"] == {"deepseek_v3": "sigmoid", "glm4_moe": "sigmoid", "phimoe": "softmax_aux"}.get(arch, "softmax")
    for values in result["metrics"]["js_pair_mean"].values():
        assert len(values) == len(result["moe_layers"]) and all(0 <= v <= math.log(2) for v in values)
    assert {"analysis.csv", "routing_js_heatmap.png", "routing_js_by_layer.png", "analyze_config.json", "routing_entropy.png",
            "all_pairs_js.png", "expert_language_map.png", "hidden_alignment.png"} <= {p.name for p in out.iterdir()}
    rows = (out / "analysis.csv").read_text().splitlines()
    assert rows[0] == "lang,layer,js_pair_mean,js_pair_norm,js_corpus,topk_overlap,routing_entropy"
    assert set(result["recommended_layers"]) <= set(result["moe_layers"]) and result["recommended_rule"]
    assert len(result["experts"]["classes"]) == len(result["moe_layers"])
    assert len(rows) == 1 + 2 * len(result["moe_layers"])


def _run(args, capsys):
    code = sara(["analyze", *args])
    return code, capsys.readouterr().err.strip()


def test_bad_inputs_give_one_line_errors_and_leave_nothing(tiny_model_dir, example_corpus, tmp_path, capsys):
    model = str(tiny_model_dir("qwen3_moe"))
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    cases = [
        ('{"id": "a", "en": "x", "sw": "y"}\n{"id": "b", "en": "x", sw}\n', f"{bad}:2: not valid JSON"),
        ('{"id": "a", "en": "x", "sw": "y"}\n{"id": "b", "sw": "y"}\n', f"{bad}:2: field 'en' (the anchor language) is missing"),
        ('{"id": "a", "en": "x", "sw": "  "}\n', f"{bad}:1: field 'sw' is an empty string"),
        ('{"id": "a", "en": {"prompt": "p"}, "sw": "y"}\n', f"{bad}:1: field 'en' needs non-empty string(s) ['response']"),
    ]
    for text, message in cases:
        bad.write_text(text)
        code, err = _run(["--model", model, "--data", str(bad), "--output-dir", str(out)], capsys)
        assert code == 1 and message in err and "\n" not in err, err
    code, err = _run(["--model", model, "--data", str(example_corpus), "--output-dir", str(out), "--langs", "sw,yo"], capsys)
    assert code == 1 and "--langs yo: not in the corpus" in err and "es,sw" in err
    code, err = _run(["--model", str(tmp_path), "--data", str(example_corpus), "--output-dir", str(out)], capsys)
    assert code == 1 and f"{tmp_path}: not a model directory (no config.json)" in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_non_moe_model_directory_is_rejected(example_corpus, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sara_moe.architectures.tiny import build_tokenizer

    tok = build_tokenizer(["hello world"], vocab_size=300)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    code, err = _run(["--model", str(tmp_path / "llama"), "--data", str(example_corpus),
                      "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 1 and "LlamaForCausalLM" in err and "no Mixture-of-Experts router" in err
    assert not (tmp_path / "out").exists()


def test_existing_analysis_is_not_overwritten(tiny_model_dir, example_corpus, tmp_path):
    analyze(tiny_model_dir("mixtral"), example_corpus, tmp_path / "a", langs=["es"])
    with pytest.raises(ValueError, match="analysis.json exists"):
        analyze(tiny_model_dir("mixtral"), example_corpus, tmp_path / "a", langs=["es"])
    assert analyze(tiny_model_dir("mixtral"), example_corpus, tmp_path / "a", langs=["es"], overwrite=True)


def test_datasets_source_is_accepted(tiny_model_dir, example_corpus, tmp_path):
    import datasets

    rows = [{"id": g.id, "en": g.texts["en"], "sw": g.texts["sw"]} for g in read_corpus(example_corpus)
            if isinstance(g.texts["en"], str)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = analyze(tiny_model_dir("olmoe"), tmp_path / "c.parquet", tmp_path / "p")
    b = analyze(tiny_model_dir("olmoe"), jsonl, tmp_path / "j")
    assert a["metrics"] == b["metrics"] and a["num_examples"] == len(rows)


def test_routers_without_their_selection_fall_back_to_topk_of_scores(tiny_model_dir, example_corpus, tmp_path,
                                                                     monkeypatch):
    """Qwen3-MoE dispatches the top-k of its softmax, so the reconstruction must give the same numbers."""
    import sara_moe.routing as R

    model_dir = tiny_model_dir("qwen3_moe")
    real = analyze(model_dir, example_corpus, tmp_path / "a", langs=["sw"], routing="dispatched", hidden=False)
    # the recorder then takes every router for one that does not return its selection (JetMoE's case)
    monkeypatch.setattr(R, "_is_selection", lambda weights, indices: False)
    rebuilt = analyze(model_dir, example_corpus, tmp_path / "b", langs=["sw"], routing="dispatched", hidden=False)
    for name, values in real["metrics"].items():
        assert rebuilt["metrics"][name]["sw"] == pytest.approx(values["sw"], abs=1e-6), name
    assert rebuilt["experts"]["counts"] == real["experts"]["counts"]
