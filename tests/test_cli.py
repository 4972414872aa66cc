"""The `sara` command line: `--help` for every verb, and one flag convention for all of them.

Every leaf verb: both spellings (`--output_dir`, `--output-dir`) and comma or spaced lists parse
to the same config, `--config run.yaml` works with a flag overriding it, the printed resolved
config reads back through `--config`, unknown flags and YAML keys are one-line errors; the cheap
verbs, run end to end on a tiny model, write that config next to their outputs.
"""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors import safe_open

from sara_moe.cli import VERBS, main

# verb (with its sub-command, if any) -> flags its --help must name
MAIN_FLAGS = {
    ("analyze",): ["--model", "--data", "--output-dir", "--overwrite"],
    ("priors",): ["--model", "--data", "--output", "--pooling", "--overwrite"],
    ("train",): ["--config", "--output_dir", "--model_name_or_path", "--data", "--priors", "--lambda_js",
                 "--align_layers", "--anchor_mode", "--overwrite_output_dir"],
    ("eval",): ["--model", "--data", "--output-dir", "--task", "--steer", "--deactivate"],
    ("report",): ["run_dirs", "--output-dir", "--baseline", "--overwrite"],
    ("steer",): ["identify", "deactivate"],
    ("steer", "deactivate"): ["--model", "--source", "--langs", "--experts", "--output"],
    ("neurons",): ["--model", "--data", "--output-dir", "--ablate", "--overwrite"],
    ("steer", "identify"): ["--model", "--task-data", "--general-data", "--layers", "--top-k", "--output"],
    ("testbed",): ["build", "pretrain"],
    ("testbed", "build"): ["--output-dir", "--config", "--seed"],
    ("testbed", "pretrain"): ["--testbed", "--output-dir", "--max-steps"],
    ("demo",): ["--output-dir", "--seed", "--full"],
    ("corpus",): ["kolibri"],
    ("corpus", "kolibri"): ["--langs", "--output", "--wheel"],
    ("tiny-model",): ["--arch", "--data", "--output-dir"],
}


def test_every_verb_has_a_help_test():
    assert {words[0] for words in MAIN_FLAGS} == set(VERBS)


@pytest.mark.parametrize("words", list(MAIN_FLAGS), ids=" ".join)
def test_verb_help_exits_0_and_names_its_flags(words, capsys):
    with pytest.raises(SystemExit) as done:
        main([*words, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sara {' '.join(words)} ")
    missing = [flag for flag in MAIN_FLAGS[words] if flag not in out]
    assert not missing, (words, missing)


def test_sara_help_lists_the_real_verbs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("verbs: " + ", ".join(VERBS))
    for verb in VERBS:  # the docstring's examples use every verb
        assert f"    sara {verb} " in out, verb
    assert main(["nonsense"]) == 2
    assert "unknown verb 'nonsense'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- one flag convention

# leaf verb -> (flags in snake_case, the config values they must parse to, a field a flag overrides over YAML)
CASES = {
    ("analyze",): (["--model", "m", "--data", "d.jsonl", "--output_dir", "out", "--batch_size", "3", "--langs",
                    "sw,yo", "--no_hidden", "--use_fraction", "0.5"],
                   {"model": "m", "data": "d.jsonl", "output_dir": "out", "batch_size": 3, "langs": ["sw", "yo"],
                    "hidden": False, "use_fraction": 0.5}, ("max_length", "64", 64)),
    ("tiny-model",): (["--data", "d.jsonl", "--output_dir", "out", "--arch", "mixtral", "--vocab_size", "600"],
                      {"data": "d.jsonl", "output_dir": "out", "arch": "mixtral", "vocab_size": 600}, ("seed", "4", 4)),
    ("priors",): (["--model", "m", "--data", "d.jsonl", "--output", "p.safetensors", "--chunk_groups", "7",
                   "--max_length", "64", "--pooling", "response"],
                  {"model": "m", "data": "d.jsonl", "output": "p.safetensors", "chunk_groups": 7, "max_length": 64,
                   "pooling": "response"}, ("batch_size", "2", 2)),
    ("train",): (["--model_name_or_path", "m", "--data", "d.jsonl", "--output_dir", "out", "--lambda_js", "0.5",
                  "--align_layers", "1-2", "--train_langs", "sw", "--max_steps", "3", "--report_to", "none"],
                 {"model_name_or_path": "m", "data": "d.jsonl", "output_dir": "out", "lambda_js": 0.5,
                  "align_layers": ["1-2"], "train_langs": "sw", "max_steps": 3, "report_to": []}, ("lora_r", "8", 8)),
    ("eval",): (["--model", "m", "--output_dir", "out", "--data", "items.jsonl", "--seeds", "0,1", "--steer_strength",
                 "0,2.5", "--steer_langs", "sw", "--max_new_tokens", "8"],
                {"model": "m", "output_dir": "out", "data": "items.jsonl", "seeds": [0, 1],
                 "steer_strengths": [0.0, 2.5], "steer_langs": ["sw"], "max_new_tokens": 8},
                ("temperature", "0.7", 0.7)),
    ("report",): (["runA", "runB", "--output_dir", "out", "--labels", "a,b", "--before_analysis", "an"],
                  {"run_dirs": ["runA", "runB"], "output_dir": "out", "labels": ["a", "b"], "before_analysis": "an"},
                  ("baseline", "b", "b")),
    ("steer", "identify"): (["--model", "m", "--task_data", "t.jsonl", "--general_data", "g.jsonl", "--output",
                             "s.json", "--top_k", "3", "--max_length", "64"],
                            {"model": "m", "task_data": "t.jsonl", "general_data": "g.jsonl", "output": "s.json",
                             "top_k": 3, "max_length": 64}, ("layers", "1-2", "1-2")),
    ("neurons",): (["--model", "m", "--data", "d.jsonl", "--output_dir", "out", "--langs", "sw,yo", "--lnp_top_rate",
                    "0.05", "--ablate"], {"model": "m", "data": "d.jsonl", "output_dir": "out", "langs": ["sw", "yo"],
                                          "lnp_top_rate": 0.05, "ablate": True}, ("batch_size", "3", 3)),
    ("steer", "deactivate"): (["--model", "m", "--output", "o.json", "--source", "n.json", "--langs", "sw,yo",
                               "--neuron_type", "related"], {"model": "m", "output": "o.json", "source": "n.json",
                                                             "langs": ["sw", "yo"], "neuron_type": "related"},
                              ("method", "lape", "lape")),
    ("testbed", "build"): (["--output_dir", "out", "--num_persons", "16", "--route_layers", "1,3", "--en_only_fraction",
                            "0.25"], {"output_dir": "out", "num_persons": 16, "route_layers": [1, 3],
                                      "en_only_fraction": 0.25}, ("seed", "9", 9)),
    # pretrain's defaults are the testbed's knobs: arch and seed come from {testbed}/testbed_config.json
    ("testbed", "pretrain"): (["--testbed", "{testbed}", "--output_dir", "out", "--max_steps", "5", "--learning_rate",
                               "0.01"], {"testbed": "{testbed}", "output_dir": "out", "max_steps": 5,
                                         "learning_rate": 0.01, "arch": "mixtral", "seed": 5}, ("seed", "9", 9)),
    ("demo",): (["--output_dir", "out", "--world_seeds", "0,2", "--ft_seeds", "1", "--size", "ci"],
                {"output_dir": "out", "world_seeds": [0, 2], "ft_seeds": 1, "size": "ci"}, ("jobs", "1", 1)),
    ("corpus", "kolibri"): (["--langs", "sw,yo", "--output", "c.jsonl", "--min_words", "2", "--allow_partial"],
                            {"langs": ["sw", "yo"], "output": "c.jsonl", "min_words": 2, "allow_partial": True},
                            ("placeholders", "strip", "strip")),
}


@pytest.fixture(scope="module")
def testbed_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("testbed")
    (folder / "testbed_config.json").write_text(json.dumps({"arch": "mixtral", "seed": 5, "max_steps": 77}))
    return str(folder)


def case(words, testbed):
    argv, expected, override = CASES[words]
    fill = lambda value: value.replace("{testbed}", testbed) if isinstance(value, str) else value  # noqa: E731
    return [fill(a) for a in argv], {k: fill(v) for k, v in expected.items()}, override


def printed(capsys, argv) -> dict:
    """The resolved config `sara ... --print_config` prints (and exits 0 on)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main([*argv, "--print_config"])
    assert done.value.code == 0
    return json.loads(capsys.readouterr().out)


def kebab(argv):
    return [a.replace("_", "-") if a.startswith("--") else a for a in argv]


def one_line_error(capsys, argv, verb) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"sara {verb}: error: "), err
    return err


def test_every_leaf_verb_has_a_parsing_case():
    leaves = {w for w in MAIN_FLAGS if not any(o != w and o[:len(w)] == w for o in MAIN_FLAGS)}
    assert set(CASES) == leaves


@pytest.mark.parametrize("words", list(CASES), ids=" ".join)
def test_both_spellings_parse_to_the_same_config(words, capsys, testbed_dir):
    argv, expected, _ = case(words, testbed_dir)
    snake = printed(capsys, [*words, *argv])
    assert {k: snake[k] for k in expected} == expected
    assert any("_" in a for a in argv if a.startswith("--"))  # a two-word flag is exercised
    assert printed(capsys, [*words, *kebab(argv)]) == snake
    # list values as separate words equal the comma form
    spaced = [part for a in argv for part in (a.split(",") if "," in a else [a])]
    assert printed(capsys, [*words, *spaced]) == snake


@pytest.mark.parametrize("words", list(CASES), ids=" ".join)
def test_config_yaml_with_a_flag_overriding_it(words, capsys, testbed_dir, tmp_path):
    argv, expected, (field, text, value) = case(words, testbed_dir)
    base = printed(capsys, [*words, *argv])
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({**expected, field: "from-yaml" if isinstance(value, str) else 0}))
    resolved = printed(capsys, [*words, "--config", str(run), f"--{field.replace('_', '-')}", text])
    assert resolved == {**base, field: value} and resolved[field] == value
    # the resolved config is itself a valid --config that gives the same config back
    run.write_text(json.dumps(resolved))
    assert printed(capsys, [*words, f"--config={run}"]) == resolved


@pytest.mark.parametrize("words", list(CASES), ids=" ".join)
def test_unknown_flags_and_keys_are_one_line_errors(words, capsys, testbed_dir, tmp_path):
    argv, expected, _ = case(words, testbed_dir)
    err = one_line_error(capsys, [*words, *argv, "--no_such_flag", "1"], words[0])
    assert f"unknown flag --no_such_flag; see `sara {' '.join(words)} --help`" in err
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({**expected, "no-such-key": 1}))
    err = one_line_error(capsys, [*words, "--config", str(run)], words[0])
    assert f"{run}: unknown key 'no-such-key' (write it no_such_key)" in err
    assert "no such file" in one_line_error(capsys, [*words, "--config", str(tmp_path / "none.yaml")], words[0])


def test_sub_verbs_positionals_and_yaml_lists(capsys, tmp_path):
    assert "unknown sub-verb 'apply'; choose one of identify" in one_line_error(capsys, ["steer", "apply"], "steer")
    assert "missing sub-verb; choose one of build, pretrain" in one_line_error(capsys, ["testbed"], "testbed")
    # report's run dirs: leading words, words after the flags, --run_dirs or YAML; not words and the flag at once
    words = printed(capsys, ["report", "a", "b", "--output_dir", "o"])
    assert words["run_dirs"] == ["a", "b"] == printed(capsys, ["report", "--output-dir", "o", "a", "b"])["run_dirs"]
    assert printed(capsys, ["report", "--run-dirs", "a", "b", "--output-dir", "o"]) == words
    err = one_line_error(capsys, ["report", "a", "--output_dir", "o", "--run_dirs", "b"], "report")
    assert "run_dirs: give them as leading words or as --run_dirs, not both" in err
    assert "unexpected argument 'stray'" in one_line_error(capsys, ["demo", "stray"], "demo")
    # YAML lists may be written "a,b" too; values are converted to the field's type
    run = tmp_path / "eval.yaml"
    run.write_text("model: m\noutput_dir: o\nseeds: 0,1\nlangs: sw, yo\nsteer_strengths: [1, 2.5]\n")
    got = printed(capsys, ["eval", "--config", str(run)])
    assert got["seeds"] == [0, 1] and got["langs"] == ["sw", "yo"] and got["steer_strengths"] == [1, 2.5]
    with pytest.raises(SystemExit) as done:  # a bad element is argparse's usage error (exit 2)
        main(["eval", "--model", "m", "--output_dir", "o", "--seeds", "0,x"])
    assert done.value.code == 2 and "invalid int value: 'x'" in capsys.readouterr().err


def test_resolved_config_is_written_next_to_the_outputs(tmp_path, example_corpus, capsys):
    """Cheap verbs end to end on a tiny model: each writes the config --print_config shows, and it reads back."""
    corpus, items, model = str(example_corpus), str(example_corpus.parent / "eval_mc.jsonl"), tmp_path / "tiny"
    runs = [  # (argv, its resolved config file, the results file whose metadata repeats it)
        (["tiny-model", "--data", corpus, "--output-dir", str(model), "--vocab_size", "600", "--seed", "1"],
         model / "tiny_model_config.json", None),
        (["analyze", "--model", str(model), "--data", corpus, "--output-dir", str(tmp_path / "an"), "--langs", "sw",
          "--no-hidden", "--batch_size", "4"], tmp_path / "an" / "analyze_config.json",
         tmp_path / "an" / "analysis.json"),
        (["priors", "--model", str(model), "--data", corpus, "--output", str(tmp_path / "p.safetensors"),
          "--max-length", "64"], tmp_path / "p.safetensors.config.json", tmp_path / "p.safetensors"),
        (["steer", "identify", "--model", str(model), "--task-data", str(example_corpus.parent / "en_task.jsonl"),
          "--output", str(tmp_path / "spec.json"), "--top_k", "1"], tmp_path / "spec.json.config.json",
         tmp_path / "spec.json"),
        *[(["eval", "--model", str(model), "--data", items, "--output_dir", str(tmp_path / arm / "eval"), "--arm", arm,
            "--device", "cpu", "--batch-size", "5"], tmp_path / arm / "eval" / "eval_config_*.json",
           tmp_path / arm / "eval" / "results_*.json") for arm in ("sft", "sara")],
        (["report", str(tmp_path / "sft" / "eval"), str(tmp_path / "sara" / "eval"), "--output-dir",
          str(tmp_path / "report"), "--baseline", "sft"], tmp_path / "report" / "report_config.json",
         tmp_path / "report" / "report.json"),
    ]
    for argv, config_file, results in runs:
        assert main(argv) == 0, argv
        [written] = config_file.parent.glob(config_file.name)
        saved = json.loads(written.read_text())
        expected = printed(capsys, argv)
        if argv[0] == "eval":
            expected["task"] = "mc"  # resolved from the items
        assert saved == expected, argv[0]
        assert printed(capsys, [*argv[:2 if argv[0] == "steer" else 1], "--config", str(written)]) == saved
        if results is not None:
            [results] = results.parent.glob(results.name)
            if results.suffix == ".safetensors":
                with safe_open(str(results), "pt") as fh:
                    meta = json.loads(fh.metadata()["metadata"])
                    assert json.loads(fh.metadata()["config"]) == saved
            else:
                meta = json.loads(results.read_text())["metadata"]
            assert meta["config"] == saved and meta["command"] == ["sara", *argv], argv[0]
    assert saved["run_dirs"] == [str(tmp_path / "sft" / "eval"), str(tmp_path / "sara" / "eval")]
    assert saved["baseline"] == "sft" and saved["output_dir"] == str(tmp_path / "report")
    assert json.loads((model / "tiny_model_config.json").read_text())["seed"] == 1
    assert json.loads((tmp_path / "an" / "analyze_config.json").read_text())["hidden"] is False
