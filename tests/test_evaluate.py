"""sara eval: item validation, answer extraction, MC scoring vs an independent computation, lm-eval agreement."""

from __future__ import annotations

import contextlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from sara_moe.evaluation.evaluate import EvalConfig, evaluate, load_model, score_mc
from sara_moe.evaluation.items import EvalItemsError, extract_number, mc_prompt, numbers_match, read_items

REPO = Path(__file__).resolve().parents[1]
MC_ITEMS = REPO / "examples" / "eval_mc.jsonl"
GEN_ITEMS = REPO / "examples" / "eval_gen.jsonl"


def _write(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD_MC = {"id": "q1", "lang": "sw", "question": "Q?", "choices": ["a", "b", "c"], "answer": 1}


@pytest.mark.parametrize("bad, field", [
    ({**GOOD_MC, "answer": 3}, "'answer' is 3, out of range"),
    ({**GOOD_MC, "answer": -1}, "'answer' is -1, out of range"),
    ({**GOOD_MC, "choices": ["only"]}, "'choices' needs at least 2"),
    ({k: v for k, v in GOOD_MC.items() if k != "lang"}, "field 'lang' is missing"),
    ({k: v for k, v in GOOD_MC.items() if k != "question"}, "field 'question' is missing"),
    ({k: v for k, v in GOOD_MC.items() if k != "answer"}, "field 'answer' is missing"),
    ({**GOOD_MC, "answer": "b"}, "field 'answer' must be the index"),
    ("{not json", "not valid JSON"),
])
def test_bad_items_name_file_line_field(tmp_path, bad, field):
    path = _write(tmp_path / "items.jsonl", [GOOD_MC | {"id": "q0"}, bad])
    with pytest.raises(EvalItemsError) as err:
        read_items(path)
    message = str(err.value)
    assert f"{path}:2:" in message and field in message and "\n" not in message


def test_missing_language_and_gen_answer(tmp_path):
    path = _write(tmp_path / "items.jsonl", [GOOD_MC])
    with pytest.raises(EvalItemsError, match=r"language\(s\) yo have zero items"):
        read_items(path, langs=["sw", "yo"])
    gen = _write(tmp_path / "gen.jsonl", [{"id": 1, "lang": "sw", "question": "2+2?", "answer": "four"}])
    with pytest.raises(EvalItemsError, match=r"gen.jsonl:1: field 'answer' must be a number"):
        read_items(gen)
    with pytest.raises(EvalItemsError, match="no items"):
        read_items(_write(tmp_path / "empty.jsonl", []))


def test_task_inferred_and_prompts():
    task, items = read_items(MC_ITEMS)
    assert task == "mc" and {i.lang for i in items} == {"en", "sw", "es"}
    plain = next(i for i in items if not i.passage)
    assert mc_prompt(plain) == (f"{plain.question}\nA. {plain.choices[0]}\nB. {plain.choices[1]}\n"
                                f"C. {plain.choices[2]}\nD. {plain.choices[3]}\nAnswer:")
    bele = next(i for i in items if i.passage)
    assert mc_prompt(bele).startswith(f"P: {bele.passage}\nQ: {bele.question}\nA: {bele.choices[0]}\nB: ")
    assert read_items(GEN_ITEMS)[0] == "gen"


@pytest.mark.parametrize("text, expected", [
    (" 42", "42"), ("1,234", "1234"), (" 18.", "18"), ("-7", "-7"), ("The answer is 42.", "42"),
    ("Janet has 16 - 3 - 4 = 9 eggs. The answer is 18", "18"), ("$1,000.50 total", "1000.5"),
    ("5 apples then 12", "12"), ("answer: -3", "-3"), ("3.0", "3"), ("no number here", None),
])
def test_extract_number_mgsm_formats(text, expected):
    assert extract_number(text) == expected


def test_numbers_match_reference_formats():
    assert numbers_match("1234", "1,234") and numbers_match("-3", -3) and numbers_match("7", 7.0)
    assert not numbers_match("7", 8) and not numbers_match(None, 7)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    path = tiny_model_dir("qwen3_moe")
    model, tokenizer = load_model(str(path), device="cpu")
    return path, model, tokenizer


def _independent_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Unbatched, from the logits: sum of log p(continuation tokens | everything before them)."""
    whole = tokenizer(context + continuation)["input_ids"]
    n_ctx = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[pos - 1, whole[pos]]) for pos in range(n_ctx, len(whole)))


def test_mc_accuracy_equals_independent_loglikelihood(tiny, tmp_path):
    path, model, tokenizer = tiny
    _, items = read_items(MC_ITEMS)
    rows = score_mc(model, tokenizer, items, batch_size=5)
    expected_acc: dict = {}
    for item, row in zip(items, rows):
        lls = [_independent_loglikelihood(model, tokenizer, mc_prompt(item), f" {letter}") for letter in "ABCD"]
        assert row["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        expected_acc.setdefault(item.lang, []).append(float(max(range(4), key=lambda k: lls[k]) == item.answer))
    # end to end through the CLI's library function: results.json and samples.jsonl agree
    out = tmp_path / "eval"
    [results_path] = evaluate(EvalConfig(model=str(path), data=str(MC_ITEMS), output_dir=str(out), batch_size=3,
                                         device="cpu"))
    results = json.loads(results_path.read_text())
    assert results["task"] == "mc" and results["metrics"] == ["acc", "acc_norm"]
    for lang, accs in expected_acc.items():
        entry = results["per_language"][lang]
        assert entry["acc"] == pytest.approx(sum(accs) / len(accs)) and entry["n"] == len(accs) == 5
        assert entry["per_seed"] == [{"seed": 0, "acc": entry["acc"], "acc_norm": entry["acc_norm"]}]
    samples = [json.loads(line) for line in (out / results["samples_file"]).read_text().splitlines()]
    assert len(samples) == len(items) and {"prediction", "acc", "loglikelihoods"} <= set(samples[0])
    assert (out / results["config_file"]).is_file()
    # a second run never overwrites the first
    [second] = evaluate(EvalConfig(model=str(path), data=str(MC_ITEMS), output_dir=str(out), device="cpu",
                                   langs=["sw"]))
    assert second != results_path and results_path.is_file()
    assert json.loads(second.read_text())["per_language"]["sw"] == results["per_language"]["sw"]


def test_generation_exact_match_and_seeds(tiny, tmp_path):
    path, _, _ = tiny
    config = EvalConfig(model=str(path), data=str(GEN_ITEMS), output_dir=str(tmp_path), device="cpu",
                        max_new_tokens=6, temperature=0.8, seeds=[0, 1], batch_size=2)
    [results_path] = evaluate(config)
    results = json.loads(results_path.read_text())
    assert results["task"] == "gen" and results["metrics"] == ["exact_match"] and results["seeds"] == [0, 1]
    samples = [json.loads(line) for line in (tmp_path / results["samples_file"]).read_text().splitlines()]
    assert len(samples) == 2 * 9
    for row in samples:
        assert row["exact_match"] == float(numbers_match(extract_number(row["generation"]), row["answer"]))
    for lang, entry in results["per_language"].items():
        assert [s["seed"] for s in entry["per_seed"]] == [0, 1] and entry["n"] == 3
        for s in entry["per_seed"]:
            mine = [r["exact_match"] for r in samples if r["lang"] == lang and r["seed"] == s["seed"]]
            assert s["exact_match"] == pytest.approx(sum(mine) / 3)


def test_steering_wraps_only_steered_languages(tiny, tmp_path, monkeypatch):
    """A stand-in steer module (the real one is tested on its own): one results file per strength."""
    path, _, _ = tiny
    entered = []

    @contextlib.contextmanager
    def steering(model, spec, strength, langs):
        handle = types.SimpleNamespace(set_language=lambda lang: entered.append((strength, lang)))
        yield handle

    fake = types.ModuleType("sara_moe.steering.steer")
    fake.load_spec = lambda p, model, tokenizer=None: {"layers": []}
    fake.steering = steering
    monkeypatch.setitem(sys.modules, "sara_moe.steering.steer", fake)
    import sara_moe.steering

    monkeypatch.setattr(sara_moe.steering, "steer", fake, raising=False)
    written = evaluate(EvalConfig(model=str(path), data=str(MC_ITEMS), output_dir=str(tmp_path), device="cpu",
                                  steer="spec.json", steer_strengths=[0.0, 2.5], steer_langs=["sw"]))
    assert [p.name.split("_steer-")[1] for p in written] == ["0.json", "2.5.json"]
    assert entered == [(0.0, "sw"), (2.5, "sw")]
    info = json.loads(written[1].read_text())["steer"]
    assert info == {"spec": "spec.json", "strength": 2.5, "langs": ["sw"]}


def test_cli_bad_input_is_one_line(tmp_path, capsys, tiny):
    from sara_moe.cli import main

    bad = _write(tmp_path / "bad.jsonl", [{**GOOD_MC, "choices": ["x"]}])
    code = main(["eval", "--model", str(tiny[0]), "--data", str(bad), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and f"{bad}:1: field 'choices'" in err


def test_builtin_and_lm_eval_agree(tiny, tmp_path, monkeypatch):
    """Same tiny model, same items: lm-eval (offline, shipped task YAML) gives the same scores."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'sara-moe[eval]')")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, _, _ = tiny
    for data, extra in ((MC_ITEMS, {}), (GEN_ITEMS, {"max_new_tokens": 8})):
        runs = {}
        for backend in ("builtin", "lm-eval"):
            out = tmp_path / backend
            [res] = evaluate(EvalConfig(model=str(path), data=str(data), output_dir=str(out), device="cpu",
                                        backend=backend, batch_size=4, **extra))
            results = json.loads(res.read_text())
            samples = {(r["lang"], r["id"]): r for r in map(json.loads, (out / results["samples_file"]).open())}
            runs[backend] = results, samples
        (ours, our_rows), (theirs, their_rows) = runs["builtin"], runs["lm-eval"]
        assert set(our_rows) == set(their_rows)
        for lang, entry in ours["per_language"].items():
            for metric in ours["metrics"]:
                assert theirs["per_language"][lang][metric] == pytest.approx(entry[metric])
        for key, row in our_rows.items():
            if "loglikelihoods" in row:
                assert their_rows[key]["loglikelihoods"] == pytest.approx(row["loglikelihoods"], abs=1e-4)
            else:
                assert their_rows[key]["generation"] == row["generation"]
