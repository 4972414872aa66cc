"""`sara --help` and `sara <verb> --help` for every verb: exit 0 and name the verb's main flags."""

from __future__ import annotations

import pytest

from sara_moe.cli import VERBS, main

# verb (with its sub-command, if any) -> flags its --help must name
MAIN_FLAGS = {
    ("analyze",): ["--model", "--data", "--output-dir", "--overwrite"],
    ("priors",): ["--model", "--data", "--output", "--pooling", "--overwrite"],
    ("train",): ["--config", "--output_dir", "--model_name_or_path", "--data", "--priors", "--lambda_js",
                 "--align_layers", "--anchor_mode", "--overwrite_output_dir"],
    ("eval",): ["--model", "--data", "--output-dir", "--task", "--steer"],
    ("report",): ["run_dirs", "--output-dir", "--baseline", "--overwrite"],
    ("steer",): ["identify"],
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
