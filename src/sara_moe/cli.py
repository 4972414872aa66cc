"""`sara` command line: one verb per pipeline stage, each a thin shell over a library function.

    sara corpus kolibri --langs sw,yo --output corpus.jsonl       # a parallel corpus (JSONL)
    sara tiny-model --arch qwen3_moe --data corpus.jsonl --output_dir runs/tiny
    sara analyze --model runs/tiny --data corpus.jsonl --output_dir runs/analysis
    sara priors --model runs/tiny --data corpus.jsonl --output runs/priors.safetensors
    sara train --config run.yaml --output_dir runs/sara --priors runs/priors.safetensors
    sara eval --model runs/sara --data items.jsonl --output_dir runs/eval
    sara report runs/eval_sft runs/eval_sara --output_dir runs/report
    sara steer identify --model runs/tiny --task_data task.jsonl --output spec.json
    sara neurons --model runs/tiny --data corpus.jsonl --output_dir runs/neurons [--ablate]
    sara steer deactivate --model runs/tiny --source runs/neurons/neurons.json --langs sw --output off.json
    sara testbed build --output_dir runs/testbed        # then: sara testbed pretrain ...
    sara demo --output_dir runs/demo

One convention for every verb (and sub-verb): its options are the fields of a config dataclass
beside the function that uses it (`AnalyzeConfig`, `SaraConfig`, ...), parsed by
`runtime.options.parse_config`
(TRL's `TrlParser`, i.e. transformers' `HfArgumentParser`). So every flag is spelled
`--snake_case` or `--kebab-case`; `--config run.yaml` reads a YAML mapping of those fields and
flags given as well override it; list fields take space- or comma-separated values (`--langs
sw yo` = `--langs sw,yo`); `--print_config` prints the resolved config as JSON and exits.
`sara report`'s run dirs may also be given as leading words (its `run_dirs` field). Each verb
writes its resolved config (every field, after YAML and flags: `artifacts.config_dict`) next to
its outputs, `<name>_config.json` in an output folder or `<file>.config.json` beside an output
file, and a valid `--config` for the same verb. `sara <verb> --help` lists a verb's flags.
This file only dispatches verbs and turns user errors into one line: every exception class
sara-moe defines (its refusals: `CorpusError`, `NotAnMoEModelError`, `ScoringProbeError`, ...),
and `ValueError`, `OSError` (missing files) and `ImportError` (a missing optional dependency),
becomes `sara <verb>: error: <message>` on stderr with exit status 1; `SARA_DEBUG=1` keeps the
traceback. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from sara_moe.runtime.artifacts import set_command

# verb -> (module, function taking argv)
VERBS = {
    "analyze": ("sara_moe.analysis.analyze", "analyze_cli"),
    "tiny-model": ("sara_moe.architectures.tiny", "tiny_model_cli"),
    "steer": ("sara_moe.steering", "steer_cli"),  # identify | deactivate
    "neurons": ("sara_moe.analysis.neurons", "neurons_cli"),
    "eval": ("sara_moe.evaluation.evaluate", "evaluate_cli"),
    "report": ("sara_moe.reporting.report", "report_cli"),
    "priors": ("sara_moe.priors", "priors_cli"),
    "train": ("sara_moe.train", "train_cli"),
    "testbed": ("sara_moe.testbed", "testbed_cli"),
    "demo": ("sara_moe.experiment.demo", "demo_cli"),
    "corpus": ("sara_moe.data.kolibri", "corpus_cli"),
}
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nverbs: " + ", ".join(VERBS))
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"sara: unknown verb {verb!r}; choose one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    module, func = VERBS[verb]
    set_command(["sara", *argv])  # written into every results file's metadata
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except Exception as err:
        # User errors are one line; set SARA_DEBUG=1 for the traceback.
        if os.environ.get("SARA_DEBUG") or not is_refusal(err):
            raise
        print(f"sara {verb}: error: {one_line(err)}", file=sys.stderr)
        return 1


def is_refusal(err: BaseException) -> bool:
    """A refusal meant for the user: any exception class defined inside sara_moe (so a new one needs no
    list here), or a bad value, a missing/unreadable file, a missing optional dependency."""
    if isinstance(err, (ValueError, OSError, ImportError)):
        return True
    return any(cls.__module__.split(".")[0] == "sara_moe" for cls in type(err).__mro__)


def one_line(err: BaseException) -> str:
    """The message on one line (a wrapped library error may span several), else the class name."""
    parts = [part.strip() for part in str(err).splitlines() if part.strip()]
    return "; ".join(parts) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
