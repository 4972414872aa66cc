"""The fault table of issue 12: each bad input or fault is refused in one line, and nothing is written.

One test per row (or per family of rows); each provokes the input through the public function
or the CLI, asserts the message, and asserts that no output appeared and no earlier output changed.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from sara_moe import priors as P
from sara_moe.analysis.analyze import analyze
from sara_moe.cli import main
from sara_moe.data.corpus import CorpusError
from sara_moe.data.train_data import build_train_dataset
from sara_moe.evaluation.items import EvalItemsError, read_items
from sara_moe.reporting.report import ReportError, build_report
from sara_moe.runtime import artifacts
from sara_moe.train import SaraConfig, SaraTrainer, build_trainer, train


def one_line(fn, pattern: str, exc=ValueError):
    with pytest.raises(exc, match=pattern) as info:
        fn()
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def cli_error(capsys, argv: list[str], pattern: str) -> str:
    """The CLI exits 1 with exactly one error line (progress bars may precede it) matching `pattern`."""
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder` (hidden staging folders included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3_moe")


@pytest.fixture(scope="module")
def priors_file(model_dir, example_corpus, tmp_path_factory):
    return P.extract_priors(str(model_dir), example_corpus, tmp_path_factory.mktemp("priors") / "p.safetensors",
                            progress=False)


def config(out, model_dir, corpus, priors=None, **overrides) -> SaraConfig:
    base = dict(output_dir=str(out), model_name_or_path=str(model_dir), data=str(corpus),
                priors=str(priors) if priors else None, report_to="none", max_steps=2, per_device_train_batch_size=4,
                save_strategy="no", gradient_checkpointing=False, disable_tqdm=True, seed=0, learning_rate=1e-3,
                lr_scheduler_type="constant", dataloader_num_workers=0)
    return SaraConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------- outputs are never lost


def test_train_refuses_a_finished_output_dir_and_overwrite_replaces_it(model_dir, priors_file, example_corpus,
                                                                       tmp_path, capsys):
    out = tmp_path / "run"
    train(config(out, model_dir, example_corpus, priors_file, max_steps=4, save_strategy="steps", save_steps=4))
    assert (out / "checkpoint-4").is_dir() and (out / "trainer_state.json").is_file()
    before = snapshot(out)
    one_line(lambda: train(config(out, model_dir, example_corpus, priors_file, max_steps=2)),
             rf"^{out} holds a finished run; choose another output_dir, pass --overwrite_output_dir to replace it$")
    assert snapshot(out) == before
    sara_run = json.loads((out / "sara_run.json").read_text())
    assert sara_run["metadata"]["versions"]["transformers"] and sara_run["metadata"]["seed"] == 0
    # an unfinished run (checkpoints only) is refused too, offering resume
    (out / "trainer_state.json").unlink()
    one_line(lambda: train(config(out, model_dir, example_corpus, priors_file, max_steps=2)),
             "holds files of an unfinished run .* or --resume_from_checkpoint true to continue it")
    # HF's flag replaces it: the old checkpoint-4 does not survive beside the new checkpoint-2
    train(config(out, model_dir, example_corpus, priors_file, max_steps=2, save_strategy="steps", save_steps=2,
                 overwrite_output_dir=True))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert "removed the previous run's files" in capsys.readouterr().err


def test_priors_and_report_refuse_existing_outputs_unless_overwrite(model_dir, example_corpus, priors_file,
                                                                    tmp_path, capsys):
    target = tmp_path / "p.safetensors"
    shutil.copy(priors_file, target)
    before = target.read_bytes()
    cli_error(capsys, ["priors", "--model", str(model_dir), "--data", str(example_corpus), "--output", str(target)],
              r"p\.safetensors exists; choose another output or pass --overwrite to replace it")
    assert target.read_bytes() == before and not target.with_name("p.safetensors.partial").exists()
    assert main(["priors", "--model", str(model_dir), "--data", str(example_corpus), "--output", str(target),
                 "--overwrite", "--chunk_groups", "7"]) == 0
    assert json.loads(target.with_name("p.safetensors.config.json").read_text())["chunk_groups"] == 7

    runs = _eval_runs(tmp_path, {"a": ["q0", "q1", "q2"], "b": ["q0", "q1", "q2"]})
    report_dir = tmp_path / "report"
    build_report(runs, report_dir)
    before = snapshot(report_dir)
    cli_error(capsys, ["report", *map(str, runs), "--output-dir", str(report_dir)],
              r"report\.json exists; choose another output or pass --overwrite to replace it")
    assert snapshot(report_dir) == before
    assert main(["report", *map(str, runs), "--output-dir", str(report_dir), "--overwrite"]) == 0
    assert json.loads((report_dir / "report.json").read_text())["metadata"]["command"][1:3] == ["report", str(runs[0])]


def test_publishing_stages_beside_the_target_not_in_tmpdir(tmp_path, monkeypatch):
    """Another filesystem as TMPDIR (a cross-device rename would fail): staging never goes there."""
    elsewhere = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
        out = tmp_path / "analysis"
        with artifacts.publishing(out, primary="a.json") as staging:
            assert staging.parent == tmp_path
            (staging / "a.json").write_text("{}")
            (staging / "b.csv").write_text("x")
        artifacts.write_json(tmp_path / "single.json", {"x": 1})
        assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis", "single.json"]
        assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.csv"] and not list(elsewhere.iterdir())
        with pytest.raises(RuntimeError):  # a failure inside the block leaves nothing behind
            with artifacts.publishing(tmp_path / "broken") as staging:
                (staging / "a.json").write_text("{}")
                raise RuntimeError("boom")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis", "single.json"]
        one_line(lambda: artifacts.write_json(tmp_path / "single.json", {"x": 2}, overwrite=False),
                 "single.json exists; choose another output or pass --overwrite")
        assert json.loads((tmp_path / "single.json").read_text()) == {"x": 1}
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


# ----------------------------------------------------------------------------- priors: fingerprint and values


def test_priors_of_another_seed_with_same_config_and_tokenizer_are_refused(model_dir, priors_file, example_corpus,
                                                                          tmp_path):
    other = tmp_path / "seed1"
    shutil.copytree(model_dir, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        param.data.normal_(0, 0.02)  # another initialisation: same config, same tokenizer
    model.save_pretrained(other)
    cache = P.load_priors(priors_file)
    tok = AutoTokenizer.from_pretrained(other)
    msg = one_line(lambda: cache.check(AutoModelForCausalLM.from_pretrained(other), tok, "all", "en"),
                   r"p\.safetensors: prior cache does not match this run \(routers: cache '\w+' vs run '\w+'; "
                   r"weight_files: .*rerun `sara priors`", P.PriorsError)
    assert "model_config:" not in msg and "tokenizer:" not in msg
    # the same model in bf16 still matches (router hash is dtype-independent), weight files too
    cache.check(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16),
                AutoTokenizer.from_pretrained(model_dir), "all", "en")
    # the Python path checks too: SaraTrainer(priors=...) with the other model
    dataset, _ = build_train_dataset(example_corpus, tok, prior_rows=cache.row_of())
    one_line(lambda: SaraTrainer(AutoModelForCausalLM.from_pretrained(other), args=config(tmp_path / "r", other,
             example_corpus), train_dataset=dataset, processing_class=tok, priors=cache), "routers: cache")
    assert not (tmp_path / "r").exists()


def test_corpus_edited_after_priors(model_dir, priors_file, example_corpus, tmp_path, monkeypatch):
    edited = tmp_path / "edited.jsonl"
    lines = example_corpus.read_text().splitlines()
    row = json.loads(lines[2])
    row["en"] = "An entirely different English sentence."
    lines[2] = json.dumps(row)
    edited.write_text("\n".join(lines) + "\n")
    # training with the stale priors: refused, naming the group
    one_line(lambda: build_trainer(config(tmp_path / "run", model_dir, edited, priors_file)),
             r"p\.safetensors: group 's03' \(example s03:\w+\) has another anchor text than when the priors were "
             r"computed; rerun `sara priors` on this corpus", P.PriorsError)
    # `sara priors` resuming after the edit recomputes instead of reusing the stale chunk
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = tmp_path / "p.safetensors"
    real, calls = P.pooled_routing, {"n": 0}

    def dies_in_second_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "pooled_routing", dies_in_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        P.extract_priors(model, example_corpus, out, tokenizer=tok, chunk_groups=10, batch_size=10, progress=False)
    assert len(list(out.with_name("p.safetensors.partial").glob("chunk_*"))) == 1 and not out.exists()
    calls["n"] = 100
    P.extract_priors(model, edited, out, tokenizer=tok, chunk_groups=10, batch_size=10, progress=False)
    assert calls["n"] == 102  # both chunks computed again: the stale one was not reused
    fresh = P.load_priors(P.extract_priors(model, edited, tmp_path / "fresh.safetensors", tokenizer=tok,
                                           progress=False))
    assert torch.allclose(P.load_priors(out).table, fresh.table, atol=1e-6)
    assert not torch.allclose(fresh.table[2], P.load_priors(priors_file).table[2], atol=1e-4)


@pytest.mark.parametrize("damage,message", [
    ("zero", r"row of example 's01', layer 0 does not sum to 1"),
    ("negate", r"row of example 's01', layer 0 has negative probabilities"),
    ("nan", r"row of example 's04', layer 2 is not finite \(NaN or inf\)"),
    ("scale", r"row of example 's01', layer 0 does not sum to 1"),
])
def test_damaged_priors_are_refused_at_load(priors_file, tmp_path, damage, message):
    from safetensors import safe_open

    table = load_file(str(priors_file))["priors"]
    if damage == "nan":
        table[3, 2, 0] = float("nan")
    else:
        table = {"zero": torch.zeros_like(table), "negate": -table, "scale": 2 * table}[damage]

    with safe_open(str(priors_file), "pt") as fh:
        meta = fh.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file({"priors": table.contiguous()}, str(bad), metadata=meta)
    one_line(lambda: P.load_priors(bad), rf"^{bad}: {message}; the file is damaged: rerun `sara priors`$",
             P.PriorsError)
    # the Python path validates too
    one_line(lambda: P.PriorCache(table, json.loads(meta["ids"]), json.loads(meta["layers"]), {}, "mine"),
             f"^mine: {message}", P.PriorsError)


def test_priors_with_another_expert_count_or_truncated(model_dir, priors_file, tmp_path):
    table = load_file(str(priors_file))["priors"]
    wide = torch.cat([table, table], dim=-1) / 2  # 16 experts, still a distribution
    cache = P.load_priors(priors_file)
    cache16 = P.PriorCache(wide, cache.ids, cache.layers, cache.fingerprint, "p16.safetensors")
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    one_line(lambda: cache16.check(model, tok, "all", "en"),
             r"^p16\.safetensors: priors have 16 experts per layer but the model has 8; rerun `sara priors`",
             P.PriorsError)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(priors_file.read_bytes()[:-100])
    one_line(lambda: P.load_priors(cut), rf"^{cut}: truncated safetensors file .*re-save or re-download it$")


# ----------------------------------------------------------------------------- corpus, items, flags


def test_duplicate_ids_are_refused_everywhere_with_both_lines(model_dir, example_corpus, tmp_path, capsys):
    dup = tmp_path / "dup.jsonl"
    lines = example_corpus.read_text().splitlines()
    dup.write_text("\n".join(lines[:5] + [lines[1]] + lines[5:8]) + "\n")
    pattern = r"dup\.jsonl:6: group id 's02' repeats line 2; ids must be unique"
    one_line(lambda: analyze(str(model_dir), dup, tmp_path / "analysis"), pattern, CorpusError)
    one_line(lambda: build_train_dataset(dup, AutoTokenizer.from_pretrained(model_dir)), pattern, CorpusError)
    one_line(lambda: P.extract_priors(str(model_dir), dup, tmp_path / "p.safetensors", progress=False), pattern,
             CorpusError)
    cli_error(capsys, ["train", "--model_name_or_path", str(model_dir), "--data", str(dup), "--output_dir",
                       str(tmp_path / "run"), "--anchor_mode", "online", "--report_to", "none"], pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.jsonl"]


def test_non_utf8_corpus_names_file_and_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"id": "a", "en": "Hello there.", "sw": "Habari."}\n'.encode()
                    + '{"id": "b", "en": "Caf\u00e9 open.", "sw": "Mgahawa."}\n'.encode("latin-1"))
    cli_error(capsys, ["analyze", "--model", str(model_dir), "--data", str(bad), "--output-dir",
                       str(tmp_path / "out")],
              r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9 at column \d+\); re-save the file as UTF-8")
    assert not (tmp_path / "out").exists()


def test_item_of_the_other_kind_is_refused(tmp_path, example_corpus):
    gen = tmp_path / "gen.jsonl"
    gen.write_text('{"id": "m1", "lang": "sw", "question": "2+2?", "answer": 4}\n'
                   '{"id": "q1", "lang": "sw", "question": "Capital?", "choices": ["a", "b"], "answer": 0}\n')
    one_line(lambda: read_items(gen), r"gen\.jsonl:2: a multiple-choice item in a generation set \(kind set by "
             r"line 1; .*\); keep one kind per file", EvalItemsError)
    one_line(lambda: read_items(gen, task="mc"), r"gen\.jsonl:1: a generation item in a multiple-choice set "
             r"\(kind set by --task", EvalItemsError)


def test_numeric_flags_are_refused(model_dir, priors_file, example_corpus, tmp_path, capsys):
    items = str(example_corpus.parent / "eval_mc.jsonl")
    for value in ("nan", "inf", "1,-inf"):
        cli_error(capsys, ["eval", "--model", str(model_dir), "--data", items, "--output-dir",
                           str(tmp_path / "eval"), "--steer", "spec.json", "--steer-strength", value],
                  r"--steer-strength (nan|inf|-inf): must be a finite number")
    from sara_moe.evaluation.evaluate import EvalConfig, evaluate

    one_line(lambda: evaluate(EvalConfig(model=str(model_dir), output_dir=str(tmp_path / "eval"),
                                         data=items, steer="spec.json",
                                         steer_strengths=[float("nan")])), r"--steer-strength nan: must be a finite")
    base = ["train", "--model_name_or_path", str(model_dir), "--data", str(example_corpus), "--priors",
            str(priors_file), "--output_dir", str(tmp_path / "run"), "--report_to", "none"]
    cli_error(capsys, base + ["--max_steps", "0"], r"field max_steps: 0 trains nothing")
    cli_error(capsys, base + ["--train_langs", "en"], r"field train_langs: only the anchor 'en'; SARA aligns other "
                                                      r"languages to it, so name at least one non-anchor language")
    cli_error(capsys, base + ["--learning_rate", "nan"], r"field learning_rate: must be a finite number")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "run").exists()
    config(tmp_path / "sft", model_dir, example_corpus, train_langs="en", lambda_js=0.0)  # plain SFT: allowed


# ----------------------------------------------------------------------------- models and tokenizers


def test_missing_local_path_fails_at_once(example_corpus, tmp_path, capsys):
    start = time.monotonic()
    for path in ("./no/such/model", str(tmp_path / "nothing"), "no-such-org/no-such-model"):
        cli_error(capsys, ["analyze", "--model", path, "--data", str(example_corpus), "--output-dir",
                           str(tmp_path / "out")], rf"{path}: no such directory")
    assert time.monotonic() - start < 20  # no hub retries (they took 48 s)
    assert not (tmp_path / "out").exists()


def test_tokenizer_without_pad_and_eos(model_dir, tmp_path, example_corpus):
    from sara_moe.runtime.loading import load_model_and_tokenizer

    folder = tmp_path / "nopad"
    shutil.copytree(model_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.eos_token = None
    tok.save_pretrained(folder)
    _, loaded = load_model_and_tokenizer(str(folder))  # documented fallback: the UNK token pads
    assert loaded.pad_token == loaded.unk_token and loaded.pad_token_id is not None
    result = analyze(str(folder), example_corpus, tmp_path / "analysis")
    assert result["num_examples"] == 20
    tok.unk_token = None
    tok.save_pretrained(folder)
    one_line(lambda: load_model_and_tokenizer(str(folder)), r"nopad: the tokenizer has no pad, EOS or UNK token to "
             r"pad with; add one")


def test_truncated_model_weights_are_named(model_dir, tmp_path, example_corpus, capsys):
    folder = tmp_path / "cut"
    shutil.copytree(model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cli_error(capsys, ["analyze", "--model", str(folder), "--data", str(example_corpus), "--output-dir",
                       str(tmp_path / "out")], rf"{weights}: truncated safetensors file")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- report over different item sets


def _eval_runs(root: Path, item_sets: dict) -> list[Path]:
    dirs = []
    for name, ids in item_sets.items():
        out = root / name / "eval"
        out.mkdir(parents=True)
        rows = [{"id": i, "lang": "sw", "acc": float(k % 2 == 0), "seed": 0} for k, i in enumerate(ids)]
        (out / "samples_x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        acc = sum(r["acc"] for r in rows) / len(rows)
        (out / "results_x.json").write_text(json.dumps({
            "task": "mc", "metrics": ["acc"], "data": "eval_mc.jsonl", "samples_file": "samples_x.jsonl",
            "per_language": {"sw": {"acc": acc, "n": len(rows)}}}))
        dirs.append(out)
    return dirs


def test_report_pairs_common_items_and_says_how_many_were_dropped(tmp_path, capsys):
    runs = _eval_runs(tmp_path, {"a": ["q0", "q1", "q2", "q3"], "b": ["q0", "q1", "q2", "q9"]})
    report = build_report(runs, tmp_path / "r")
    (comparison,) = report["benchmarks"][0]["comparisons"]
    assert comparison["n_items"] == 3 and comparison["n_dropped"] == 2
    assert main(["report", *map(str, runs), "--output-dir", str(tmp_path / "r2")]) == 0
    assert "paired on the common item ids only: 2 item(s) not evaluated in every run were dropped" in \
        capsys.readouterr().out
    disjoint = _eval_runs(tmp_path / "d", {"a": ["q0", "q1"], "b": ["x0", "x1"]})
    one_line(lambda: build_report(disjoint, tmp_path / "r3"), r"arms 'a' and 'b' share no item id for language 'sw'",
             ReportError)
    assert not (tmp_path / "r3").exists()


# ----------------------------------------------------------------------------- checkpoints


class DieWhileSaving(TrainerCallback):
    """Interrupt the checkpoint write of `step` after the weights, before trainer_state.json."""

    def __init__(self, trainer, step: int):
        self.trainer, self.step = trainer, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            def killed(*a, **k):
                raise KeyboardInterrupt("killed during the checkpoint write")

            # HF Trainer's own step inside _save_checkpoint (no public hook runs mid-write): fail there
            self.trainer._save_rng_state = killed


def test_resume_after_a_kill_during_a_checkpoint_write(model_dir, priors_file, example_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = config(out, model_dir, example_corpus, priors_file, max_steps=6, save_strategy="steps", save_steps=2)
    trainer, _ = build_trainer(cfg)
    trainer.add_callback(DieWhileSaving(trainer, 4))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    partial = out / "checkpoint-4"
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    resumed = train(config(out, model_dir, example_corpus, priors_file, max_steps=6, save_strategy="steps",
                           save_steps=2, resume_from_checkpoint="true"))
    err = capsys.readouterr().err
    assert f"{partial} is incomplete (no trainer_state.json; interrupted while it was written), moved to " \
           "incomplete-checkpoint-4; resuming from the previous complete checkpoint" in err
    assert f"resuming from {out / 'checkpoint-2'}" in err
    assert resumed.state.global_step == 6
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6", "incomplete-checkpoint-4"]
    assert [h["step"] for h in resumed.state.log_history if "js_loss" in h] == [1, 2, 3, 4, 5, 6]
    one_line(lambda: train(config(tmp_path / "empty", model_dir, example_corpus, priors_file,
                                  resume_from_checkpoint="true")),
             "empty: no complete checkpoint to resume from; drop --resume_from_checkpoint")


def test_artifact_helpers_on_every_results_file(tmp_path):
    meta = artifacts.run_metadata({"k": 1}, seed=3, device="cpu")
    assert meta["seed"] == 3 and meta["device"] == "cpu" and meta["config"] == {"k": 1}
    assert set(meta["versions"]) >= {"torch", "transformers", "trl", "peft", "python"}
    assert meta["git"] is None or len(meta["git"]["commit"]) == 40
    assert artifacts.text_sha({"prompt": "a", "response": "b"}) == artifacts.text_sha({"response": "b", "prompt": "a"})
    assert artifacts.text_sha("a") != artifacts.text_sha("b")
