"""`sara` command line: one verb per pipeline stage, each a thin shell over a library function.

    sara corpus kolibri --langs sw,yo --output corpus.jsonl       # a parallel corpus (JSONL)
    sara tiny-model --arch qwen3_moe --data corpus.jsonl --output-dir runs/tiny
    sara analyze --model runs/tiny --data corpus.jsonl --output-dir runs/analysis
    sara priors --model runs/tiny --data corpus.jsonl --output runs/priors.safetensors
    sara train --config run.yaml --output_dir runs/sara --priors runs/priors.safetensors
    sara eval --model runs/sara --data items.jsonl --output-dir runs/eval
    sara report runs/eval_sft runs/eval_sara --output-dir runs/report
    sara steer identify --model runs/tiny --task-data task.jsonl --output spec.json
    sara testbed build --output-dir runs/testbed        # then: sara testbed pretrain ...
    sara demo --output-dir runs/demo

`sara <verb> --help` lists a verb's flags. Two flag styles exist today: `train` and `priors`
take TRL/HF-style flags (`--output_dir`, `--config run.yaml` through TrlParser), the other
verbs argparse kebab-case (`--output-dir`). Each verb's module parses its own flags and calls
the library function; this file only dispatches (and turns user errors into one line).
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module, function taking argv)
VERBS = {
    "analyze": ("sara_moe.analyze", "analyze_cli"),
    "tiny-model": ("sara_moe.tiny", "tiny_model"),
    "steer": ("sara_moe.steer", "steer_cli"),
    "eval": ("sara_moe.evaluate", "evaluate_cli"),
    "report": ("sara_moe.report", "report_cli"),
    "priors": ("sara_moe.priors", "priors_cli"),
    "train": ("sara_moe.train", "train_cli"),
    "testbed": ("sara_moe.testbed", "testbed_cli"),
    "demo": ("sara_moe.demo", "demo_cli"),
    "corpus": ("sara_moe.kolibri", "corpus_cli"),
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
    from .artifacts import set_command

    set_command(["sara", *argv])  # written into every results file's metadata
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except (ValueError, FileNotFoundError, OSError) as err:
        # User errors are one line; set SARA_DEBUG=1 for the traceback.
        import os

        if os.environ.get("SARA_DEBUG"):
            raise
        print(f"sara {verb}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
