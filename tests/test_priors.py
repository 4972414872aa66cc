"""`sara priors`: values, pooling spans, fingerprint, resume, atomic write, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sara_moe import priors as P
from sara_moe.data.corpus import CorpusError, encode, read_corpus
from sara_moe.data.train_data import build_train_dataset


def _pooled_by_hand(model, ids, prompt_len, pooling, sigmoid):
    """Independent recomputation: unpadded forward, router logits -> distribution -> mean over span."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
    rows = []
    for logits in out.router_logits:  # one [S, E] per MoE layer, in layer order
        if sigmoid:
            s = torch.sigmoid(logits.float())
            dist = s / s.sum(-1, keepdim=True)
        else:
            dist = torch.softmax(logits.float(), -1)
        span = {"all": slice(0, len(ids)), "prompt": slice(0, prompt_len), "response": slice(prompt_len, len(ids))}
        rows.append(dist[span[pooling]].mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_priors_match_unbatched_recomputation(arch, tiny_model_dir, example_corpus, tmp_path):
    path = tiny_model_dir(arch)
    out = P.extract_priors(str(path), example_corpus, tmp_path / "p.safetensors", batch_size=3, progress=False)
    cache = P.load_priors(out)
    groups = list(read_corpus(example_corpus))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    moe = [s.layer for s in __import__("sara_moe.architectures", fromlist=["x"]).find_routers(model)]
    assert cache.ids == [g.id for g in groups] and cache.layers == moe
    assert cache.table.shape == (len(groups), len(moe), 8) and cache.table.dtype == torch.float32
    assert torch.allclose(cache.table.sum(-1), torch.ones(len(groups), len(moe)), atol=1e-5)
    for row in (0, len(groups) - 1):  # a plain string group and an instruction group
        ids, prompt_len = encode(groups[row].texts["en"], tok, 1024)
        expected = _pooled_by_hand(model, ids, prompt_len, "all", sigmoid=arch == "deepseek_v3")
        assert torch.allclose(cache.table[row], expected, atol=1e-5), (arch, row)
    fp = cache.fingerprint
    assert fp["pooling"] == "all" and fp["layers"] == moe and fp["anchor"] == "en"
    assert set(fp) == {"model_config", "tokenizer", "chat_template", "routers", "num_experts", "weight_files",
                       "pooling", "layers", "anchor", "scoring", "router_site"}
    assert fp["scoring"] == ("sigmoid" if arch == "deepseek_v3" else "softmax")
    assert fp["router_site"] == ("mlp.router" if arch == "gpt_oss" else "mlp.gate")
    assert set(fp["weight_files"]) == {"model.safetensors"} and len(cache.text_sha) == len(groups)
    assert json.loads((tmp_path / "p.safetensors.config.json").read_text())["pooling"] == "all"
    assert not (tmp_path / "p.safetensors.partial").exists()


def test_prompt_and_response_pooling(tiny_model_dir, example_corpus, tmp_path):
    path = tiny_model_dir("qwen3_moe")
    instr = tmp_path / "instr.jsonl"
    instr.write_text("".join(line + "\n" for line in example_corpus.read_text().splitlines() if '"prompt"' in line))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    group = next(iter(read_corpus(instr)))
    ids, prompt_len = encode(group.texts["en"], tok, 1024)
    tables = {}
    for pooling in ("prompt", "response"):
        out = P.extract_priors(model, instr, tmp_path / f"{pooling}.safetensors", pooling=pooling, tokenizer=tok,
                               progress=False)
        tables[pooling] = P.load_priors(out).table
        assert torch.allclose(tables[pooling][0], _pooled_by_hand(model, ids, prompt_len, pooling, False), atol=1e-5)
    assert not torch.allclose(tables["prompt"], tables["response"], atol=1e-3)
    with pytest.raises(CorpusError, match="no prompt tokens"):  # plain strings have no prompt span
        P.extract_priors(model, example_corpus, tmp_path / "bad.safetensors", pooling="prompt", tokenizer=tok,
                         progress=False)
    assert not (tmp_path / "bad.safetensors").exists()


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


@pytest.mark.parametrize("chat", [False, True], ids=["plain_template", "chat_template"])
def test_priors_pool_the_ids_training_feeds(chat, tiny_model_dir, example_corpus, tmp_path, monkeypatch):
    """Byte for byte, with each side's defaults: the ids (and prompt length) priors pool for a group's anchor
    are the ids training feeds for that group's anchor example and carries as its online anchor."""
    path = tiny_model_dir("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    pooled, real = [], P.pooled_routing

    def recording(model, recorder, sequences, tokenizer, prompt_lengths, *args):
        pooled.extend((list(ids), n) for ids, n in zip(sequences, prompt_lengths))
        return real(model, recorder, sequences, tokenizer, prompt_lengths, *args)

    monkeypatch.setattr(P, "pooled_routing", recording)
    P.extract_priors(model, example_corpus, tmp_path / "p.safetensors", tokenizer=tok, progress=False)
    data, _ = build_train_dataset(example_corpus, tok, anchor="en", train_anchor=True, anchor_mode="online")
    anchors = {row["sara_name"][:-3]: row for row in data if row["sara_name"].endswith(":en")}
    trained = [(row["input_ids"], row["labels"].count(-100)) for row in anchors.values()]
    assert len(trained) == len(list(read_corpus(example_corpus))) and sorted(pooled) == sorted(trained)
    assert any(n > 0 for _, n in trained) and any(n == 0 for _, n in trained)  # instruction and plain groups
    others = [row for row in data if not row["sara_name"].endswith(":en")]
    assert others and all(row["sara_anchor_ids"] == anchors[row["sara_name"].rsplit(":", 1)[0]]["input_ids"]
                          for row in others)


def test_resume_after_interruption_and_atomic_output(tiny_model_dir, example_corpus, tmp_path, monkeypatch):
    path = tiny_model_dir("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    full = P.load_priors(P.extract_priors(model, example_corpus, tmp_path / "full.safetensors", tokenizer=tok,
                                          chunk_groups=6, progress=False)).table
    real, calls = P.pooled_routing, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # dies inside the second chunk
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "pooled_routing", flaky)
    out = tmp_path / "p.safetensors"
    with pytest.raises(KeyboardInterrupt):
        P.extract_priors(model, example_corpus, out, tokenizer=tok, chunk_groups=6, batch_size=3, progress=False)
    assert not out.exists()
    assert len(list((tmp_path / "p.safetensors.partial").glob("chunk_*.safetensors"))) == 1
    calls["n"] = 100  # no more failures; count the batches the resumed run needs
    P.extract_priors(model, example_corpus, out, tokenizer=tok, chunk_groups=6, batch_size=3, progress=False)
    assert calls["n"] - 100 == 5  # 20 groups in chunks of 6,6,6,2; chunk 0 reused; 2 + 2 + 1 batches of 3
    assert torch.allclose(P.load_priors(out).table, full, atol=1e-6)
    assert not (tmp_path / "p.safetensors.partial").exists()


def test_fingerprint_mismatch_names_the_part(tiny_model_dir, example_corpus, tmp_path):
    path = tiny_model_dir("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    cache = P.load_priors(P.extract_priors(model, example_corpus, tmp_path / "p.safetensors", tokenizer=tok,
                                           progress=False))
    cache.check(model, tok, "all", "en")  # same run: passes
    with pytest.raises(ValueError, match=r"p\.safetensors: .*pooling: cache 'all' vs run 'response'"):
        cache.check(model, tok, "response", "en")
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral"))
    with pytest.raises(ValueError, match="model_config"):
        cache.check(other, tok, "all", "en")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="chat_template") as err:
        cache.check(model, tok, "all", "en")
    assert "model_config" not in str(err.value) and "\n" not in str(err.value)


def test_bad_corpus_inputs(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen3_moe")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "en": "Hello there.", "sw": "Habari."}\n{"id": "b", "sw": "Habari yako."}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: field 'en' \(the anchor language\) is missing"):
        P.extract_priors(str(path), bad, tmp_path / "p.safetensors", progress=False)
    bad.write_text('{"id": "a", "en": "", "sw": "Habari."}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:1: field 'en' is an empty string"):
        P.extract_priors(str(path), bad, tmp_path / "p.safetensors", progress=False)
    with pytest.raises(ValueError, match="pooling must be one of"):
        P.extract_priors(str(path), bad, tmp_path / "p.safetensors", pooling="mean", progress=False)
    assert not (tmp_path / "p.safetensors").exists()
