"""`--device_map` for priors and eval (a model larger than one GPU): the same numbers as one device."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from sara_moe.cli import main
from sara_moe.evaluation.evaluate import EvalConfig, evaluate
from sara_moe.priors import extract_priors

REPO_ITEMS = "examples/eval_mc.jsonl"


def test_priors_with_device_map_equal_priors_on_one_device(tiny_model_dir, example_corpus, tmp_path):
    model = str(tiny_model_dir("qwen3_moe"))
    plain = extract_priors(model, example_corpus, tmp_path / "plain.safetensors", device="cpu", progress=False)
    spread = extract_priors(model, example_corpus, tmp_path / "spread.safetensors", device_map="auto", progress=False)
    a, b = load_file(str(plain))["priors"], load_file(str(spread))["priors"]
    assert a.shape == b.shape and a.sum() > 0
    assert (a == b).all()  # accelerate places every layer on the CPU here: the same ops, bit for bit
    config = json.loads((tmp_path / "spread.safetensors.config.json").read_text())
    assert config["device_map"] == "auto"


def test_eval_with_device_map_equals_eval_on_one_device(tiny_model_dir, tmp_path):
    from pathlib import Path

    items = str(Path(__file__).resolve().parents[1] / REPO_ITEMS)
    model = str(tiny_model_dir("qwen3_moe"))
    plain = evaluate(EvalConfig(model=model, data=items, output_dir=str(tmp_path / "a"), device="cpu"))
    spread = evaluate(EvalConfig(model=model, data=items, output_dir=str(tmp_path / "b"), device_map="auto"))
    a, b = (json.loads(p[0].read_text())["per_language"] for p in (plain, spread))
    assert a == b and set(a) == {"en", "es", "sw"}


def test_device_map_under_a_launcher_is_one_line(tiny_model_dir, example_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: each rank would load its own spread copy
    out = tmp_path / "p.safetensors"
    code = main(["priors", "--model", str(tiny_model_dir("qwen3_moe")), "--data", str(example_corpus),
                 "--output", str(out), "--device_map", "auto"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--device_map auto" in err and "without torchrun" in err
    assert not out.exists()
