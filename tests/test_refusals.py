"""Every refusal sara-moe raises on purpose reaches the CLI user as one line, and nothing is written.

The refusal classes are read from the code: every exception class defined in `src/sara_moe`, and every
builtin exception class a `raise` statement there names. Each needs a case below that provokes it
through the real `sara` verb where a user meets it, on real tiny inputs (tiny random models of the
family at fault, bad files, priors made for another model); a new refusal class without a case fails
`test_every_refusal_class_has_a_case`. A case asserts: exit status 1, stderr exactly one line
`sara <verb>: error: ...` naming the model or file at fault, no "Traceback", the output not created.
Where a module still falls short (a file left behind, a model named by its type and not its directory),
the case asserts everything else, asserts the shortfall is still there, and ends as xfail naming the
module; once the module is fixed the case fails until its entry in KNOWN_WRITES / KNOWN_UNNAMED goes.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import sara_moe
from sara_moe import priors as P
from sara_moe.architectures.families import Family, build_tiny_family
from sara_moe.architectures.tiny import build_tokenizer, save_tiny
from sara_moe import cli
from sara_moe.cli import is_refusal, main, one_line

PKG = Path(sara_moe.__file__).resolve().parent
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# builtin classes raised in src/sara_moe that are not refusals: a broken invariant of the library's own
# use (a recorder read outside its forward), or `--help`'s clean exit; these keep their traceback
NOT_REFUSALS = {"RuntimeError", "SystemExit"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def defined_exception_classes() -> dict[str, type]:
    """{name: class} of every exception class a module of sara_moe defines (imported, so bases resolve);
    a private one (`_Name`) is control flow caught where it is raised, never shown to a user."""
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names = [node.name for node in tree.body if isinstance(node, ast.ClassDef) and node.bases
                 and not node.name.startswith("_")]
        if not names:
            continue
        module = importlib.import_module(_module_name(path))
        for name in names:
            cls = getattr(module, name)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found[name] = cls
    return found


def raised_builtin_classes() -> set[str]:
    """Names of the builtin exception classes that `raise X(...)` statements in sara_moe name."""
    found = set()
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = getattr(target, "id", None)
                if isinstance(getattr(builtins, name or "", None), type) and issubclass(getattr(builtins, name),
                                                                                        BaseException):
                    found.add(name)
    return found


# ----------------------------------------------------------------------------- tiny inputs


def _save_with_tokenizer(model, folder: Path, texts) -> Path:
    """`save_pretrained` a model with a local tokenizer that fits its vocabulary."""
    vocab = model.config.get_text_config().vocab_size
    build_tokenizer(texts, vocab_size=min(300, vocab)).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def _family(config_cls: str, model_cls: str) -> Family:
    return Family("", getattr(transformers, config_cls), getattr(transformers, model_cls), (), False)


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, example_texts, example_corpus, tmp_path_factory):
    """Every input the cases need, built once: models of the refused kinds, damaged and foreign files."""
    root = tmp_path_factory.mktemp("refusal_inputs")
    qwen = tiny_model_dir("qwen3_moe")
    made = {"qwen": qwen, "corpus": example_corpus}
    made["jetmoe"] = _save_with_tokenizer(build_tiny_family(_family("JetMoeConfig", "JetMoeForCausalLM")),
                                          root / "jetmoe", example_texts)
    made["doge"] = _save_with_tokenizer(build_tiny_family(_family("DogeConfig", "DogeForCausalLM")),
                                        root / "doge", example_texts)
    torch.manual_seed(0)
    dense = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128))
    made["dense"] = _save_with_tokenizer(dense, root / "dense_qwen3", example_texts)
    switch = transformers.SwitchTransformersForConditionalGeneration(transformers.SwitchTransformersConfig(
        vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1))
    made["encoder_decoder"] = _save_with_tokenizer(switch, root / "switch", example_texts)

    truncated = shutil.copytree(qwen, root / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    made["truncated"] = truncated

    nan_model = shutil.copytree(qwen, root / "nan_weights")
    model = transformers.AutoModelForCausalLM.from_pretrained(nan_model)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(nan_model)
    made["nan"] = nan_model

    # the same family, config and tokenizer as `qwen`, another initialisation: its priors are not qwen's
    made["other_seed"] = save_tiny("qwen3_moe", root / "other_seed", example_texts, seed=1, vocab_size=600)
    made["other_priors"] = P.extract_priors(str(made["other_seed"]), example_corpus, root / "other.safetensors",
                                            progress=False)

    lines = example_corpus.read_text().splitlines()
    made["dup_corpus"] = root / "dup.jsonl"
    made["dup_corpus"].write_text("\n".join(lines[:3] + [lines[0]]) + "\n")
    made["bad_items"] = root / "items_no_answer.jsonl"
    made["bad_items"].write_text('{"id": "q1", "lang": "sw", "question": "2+2?", "choices": ["3", "4"]}\n')
    made["bad_spec"] = root / "spec.json"
    made["bad_spec"].write_text(json.dumps({"format": "not-a-spec"}))
    made["empty_run"] = root / "empty_run"
    made["empty_run"].mkdir()
    return made


def _train(model, out, *extra) -> list[str]:
    return ["train", "--model_name_or_path", str(model), "--data", str(EXAMPLES / "parallel.jsonl"),
            "--output_dir", str(out), "--report_to", "none", "--max_steps", "1", "--save_strategy", "no",
            "--per_device_train_batch_size", "2", "--gradient_checkpointing", "false", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0", *extra]


def _analyze(model, out, data=None) -> list[str]:
    return ["analyze", "--model", str(model), "--data", str(data or EXAMPLES / "parallel.jsonl"),
            "--output-dir", str(out)]


def terminal_lines(err: str) -> list[str]:
    """The lines a terminal shows of `err`: a progress bar that erased itself (carriage return, leave=False)
    leaves nothing."""
    shown = (line.rsplit("\r", 1)[-1] for line in err.split("\n"))
    return [line for line in shown if line.strip()]


@pytest.fixture
def no_progress_bars():
    """Progress bars (weights loading, dataset maps) are progress, not the error: off, so stderr holds only it."""
    import datasets


    hf_logging = transformers.utils.logging
    were = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    yield
    if were[0]:
        hf_logging.enable_progress_bar()
    if were[1]:
        datasets.enable_progress_bars()


# case -> (exception class name, build(inputs, out) -> (argv, text the line must name, more it must say))
CASES = {
    "truncated weights": ("ArtifactError", lambda i, out: (
        _analyze(i["truncated"], out), str(i["truncated"] / "model.safetensors"), "truncated safetensors file")),
    "duplicate corpus id": ("CorpusError", lambda i, out: (
        _analyze(i["qwen"], out, i["dup_corpus"]), f"{i['dup_corpus']}:4", "ids must be unique")),
    "eval item without answer": ("EvalItemsError", lambda i, out: (
        ["eval", "--model", str(i["qwen"]), "--data", str(i["bad_items"]), "--output-dir", str(out)],
        str(i["bad_items"]), "answer")),
    "report of an empty run dir": ("ReportError", lambda i, out: (
        ["report", str(i["empty_run"]), "--output-dir", str(out)], str(i["empty_run"]), "run `sara eval")),
    "report with a missing neuron comparison": ("NeuronComparisonError", lambda i, out: (
        ["report", str(i["empty_run"]), "--neurons", str(out.parent / "no_cmp"), "--output-dir", str(out)],
        str(out.parent / "no_cmp"), "run `sara neurons --compare")),
    "priors of another model": ("PriorsError", lambda i, out: (
        _train(i["qwen"], out, "--priors", str(i["other_priors"])), str(i["other_priors"]),
        "rerun `sara priors` with this model")),
    "not a steering spec": ("SteeringSpecError", lambda i, out: (
        ["eval", "--model", str(i["qwen"]), "--data", str(EXAMPLES / "eval_mc.jsonl"), "--output-dir", str(out),
         "--steer", str(i["bad_spec"])], str(i["bad_spec"]), "not a sara-moe steering spec")),
    "dense model": ("NotAnMoEModelError", lambda i, out: (
        _analyze(i["dense"], out), str(i["dense"]), "needs an MoE checkpoint")),
    "router site the model lacks (JetMoE)": ("NotAnMoEModelError", lambda i, out: (
        [*_analyze(i["jetmoe"], out), "--router_site", "mlp.gate"], str(i["jetmoe"]),
        "its router sites are ['mlp.router', 'self_attention.experts.router']")),
    "auto layers without an analysis file": ("LayerSpecError", lambda i, out: (
        _train(i["qwen"], out, "--anchor_mode", "online", "--align_layers", "auto", "--analysis",
               str(out.parent / "no_analysis.json")), str(out.parent / "no_analysis.json"), "give layers explicitly")),
    "product-key routing (Doge)": ("ScoringProbeError", lambda i, out: (
        _analyze(i["doge"], out), str(i["doge"]), "no dispatch weights could be captured")),
    "kolibri wheel missing": ("KolibriError", lambda i, out: (
        ["corpus", "kolibri", "--langs", "sw", "--wheel", str(out.parent / "kolibri.whl"), "--output", str(out)],
        str(out.parent / "kolibri.whl"), "no such file")),
    "loss turns nan": ("TrainingDivergedError", lambda i, out: (
        _train(i["nan"], out, "--anchor_mode", "online", "--lambda_js", "0"), str(out), "loss is nan")),
    "missing model dir": ("FileNotFoundError", lambda i, out: (
        _analyze(out.parent / "no_such_model", out), str(out.parent / "no_such_model"), "no such directory")),
    "encoder-decoder model": ("ValueError", lambda i, out: (
        _analyze(i["encoder_decoder"], out), str(i["encoder_decoder"]), "give a decoder-only MoE checkpoint")),
    "demo world that fails validity": ("InvalidWorld", lambda i, out: (
        ["demo", "--size", "ci", "--ft-seeds", "1", "--jobs", "1", "--output-dir", str(out)], "world seed 0",
        "try another world seed")),
    "4-bit without bitsandbytes": ("ImportError", lambda i, out: (
        _train(i["qwen"], out, "--anchor_mode", "online", "--use_peft", "true", "--load_in_4bit", "true"),
        "load_in_4bit", "pip install bitsandbytes")),
}


# a refusal met after training started leaves the run's record, which its message points at
RUN_RECORD = {"loss turns nan": {"sara_config.json", "sara_run.json"},
              # the pretrained world and its base evaluation stay cached: a rerun with the open rule reuses them
              "demo world that fails validity": {"demo_config.json", "experiment_config.json", "worlds", "runs"}}
# refusals that still leave a file behind, each a bug in the module named (the case fails once it is fixed,
# so this list cannot go stale)
KNOWN_WRITES: dict = {}


# refusals of a model whose line names its class and model_type but not the directory the user gave
# (case -> (what the line names instead, where the message is made)); each case fails once the path is named
KNOWN_UNNAMED: dict = {}


def test_every_refusal_class_has_a_case():
    defined = defined_exception_classes()
    assert {"ScoringProbeError", "NotAnMoEModelError", "PriorsError"} <= set(defined)  # the walk sees them
    assert all(is_refusal(cls("x")) for cls in defined.values())  # defined in sara_moe: the CLI keeps it to one line
    wanted = set(defined) | (raised_builtin_classes() - NOT_REFUSALS)
    covered = {name for name, _ in CASES.values()}
    assert wanted == covered, f"no case for {sorted(wanted - covered)}; stale cases for {sorted(covered - wanted)}"


@pytest.mark.parametrize("case", list(CASES))
def test_refusal_is_one_line_naming_the_culprit(case, inputs, tmp_path, capsys, monkeypatch, no_progress_bars):
    monkeypatch.delenv("SARA_DEBUG", raising=False)
    name, build = CASES[case]
    if name == "ImportError" and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.fail("bitsandbytes is installed here: give this case another missing optional dependency")
    out = tmp_path / "out"
    argv, culprit, advice = build(inputs, out)
    seen = []  # the exception main() turned into the line, to check it is the case's class

    def recording(err):
        seen.append(err)
        return one_line(err)

    monkeypatch.setattr(cli, "one_line", recording)
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert [type(e).__name__ for e in seen] == [name], (case, seen, err)
    assert "Traceback" not in err, err
    lines = terminal_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sara {argv[0]}: error: "), lines[0]
    assert advice in lines[0], lines[0]
    gaps = []
    if case in KNOWN_UNNAMED:
        named, where = KNOWN_UNNAMED[case]
        assert named in lines[0], lines[0]
        assert culprit not in lines[0], f"{case}: the line names {culprit} now; drop it from KNOWN_UNNAMED"
        gaps.append(f"names {named}, not the model directory ({where})")
    else:
        assert culprit in lines[0], lines[0]
    written = sorted(p.name for p in out.iterdir()) if out.is_dir() else ([out.name] if out.exists() else [])
    if case in RUN_RECORD:
        assert set(written) == RUN_RECORD[case], written  # no weights, no checkpoint: nothing to mistake for a model
    elif case in KNOWN_WRITES:
        assert out.exists(), f"{case}: nothing written any more; drop it from KNOWN_WRITES"
        gaps.append(f"{KNOWN_WRITES[case]} (left {written})")
    else:
        assert not out.exists(), written
    if gaps:  # every other assertion held; these are the module bugs the case still shows
        pytest.xfail("; ".join(gaps))


def test_one_line_joins_a_multi_line_message():
    assert one_line(ValueError("bad config\n\n  field x: too big\n")) == "bad config; field x: too big"
    assert one_line(OSError()) == "OSError"
    assert not is_refusal(RuntimeError("a bug")) and not is_refusal(KeyError("k"))
    assert is_refusal(FileNotFoundError("f")) and is_refusal(ModuleNotFoundError("m"))


def test_real_command_line_prints_one_line_and_sara_debug_keeps_the_traceback(inputs, tmp_path):
    """The installed entry point end to end, as a user runs it (a fresh process, stderr as the terminal sees it)."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "sara_moe.cli", *_analyze(inputs["doge"], out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # bars are not errors
    env.pop("SARA_DEBUG", None)
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"sara analyze: error: {inputs['doge']} (DogeForCausalLM): model_type='doge', "
                                  "router class DogeCDMoE: "), done.stderr
    debug = subprocess.run(argv, capture_output=True, text=True, env={**env, "SARA_DEBUG": "1"}, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ScoringProbeError" in debug.stderr
    assert not out.exists()
