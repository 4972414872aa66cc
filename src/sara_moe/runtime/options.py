"""How every verb reads its options: a config dataclass from `--config` YAML, then flags.

    from sara_moe.runtime.options import parse_config
    cfg = parse_config(AnalyzeConfig, argv, "sara analyze", "Cross-lingual routing divergence.")

`parse_config` wraps TRL's `TrlParser` (transformers' `HfArgumentParser`): every field is a
flag spelled `--snake_case` or `--kebab-case`, `--config run.yaml` sets fields and flags
override it, the project's list fields also take `a,b`, `--print_config` prints the resolved
config and exits. `dispatch` runs a sub-verb (`sara testbed build`). Library plumbing, not the
CLI: each stage's `<verb>_cli(argv)` calls it, and `sara_moe.cli` only dispatches verbs.
"""

from __future__ import annotations

import json
import os
import sys

from sara_moe.runtime.artifacts import config_dict

PRINT_CONFIG = ("--print_config", "--print-config")
CONFIG_HELP = ("--config RUN.yaml: a YAML mapping whose keys are these fields (snake_case); flags given as well "
               "override it. Every flag is spelled --snake_case or --kebab-case; list flags take space- or "
               "comma-separated values. --print_config: print the resolved config as JSON and exit.")


def parse_config(cls, argv, prog: str, doc: str = "", positional: str | None = None, defaults: dict | None = None):
    """The one way a verb reads its options: `cls` (a dataclass) from `--config` YAML, then flags.

    `positional` names a list field that leading words fill (`sara report DIR DIR`); `defaults`
    (a dict, or a function of a first parse returning one) replace the dataclass defaults, below
    the YAML and the flags. Unknown flags and YAML keys are one-line ValueErrors naming them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    show = any(arg in PRINT_CONFIG for arg in argv)
    argv = [arg for arg in argv if arg not in PRINT_CONFIG]
    if callable(defaults):  # e.g. the knobs of the testbed that `--testbed` names
        defaults = defaults(parse_config(cls, argv, prog, doc, positional))
    words = f"[{positional.upper()} ...] " if positional else ""
    parser = _parser_class()((cls,), prog=prog, description=doc, epilog=CONFIG_HELP,
                             usage=f"{prog} {words}[--config RUN.yaml] [--print_config] [--FIELD VALUE ...]")
    own = {name for klass in cls.__mro__ if klass.__module__.startswith("sara_moe")
           for name in vars(klass).get("__annotations__", {})}
    for action in parser._actions:  # the project's list fields also take "a,b": split after parsing
        if action.nargs == "+" and action.dest in own and action.type in (str, int, float):
            parser.lists[action.dest], action.type = (action, action.type), None
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    config_path = _config_path(argv)
    if defaults:
        names = {action.dest for action in parser._actions}
        parser.set_defaults_with_config(**{k: v for k, v in defaults.items() if k in names})
    cfg, from_file, rest = parser.parse_args_and_config(args=argv, return_remaining_strings=True,
                                                        separate_remaining_strings=True)
    if from_file:
        key = from_file[0][2:]
        hint = f" (write it {key.replace('-', '_')})" if "-" in key else ""
        raise ValueError(f"{config_path}: unknown key {key!r}{hint}; the keys are the flags of `{prog} --help`")
    flags = [arg for arg in rest if arg.startswith("-")]
    if flags:
        raise ValueError(f"unknown flag {flags[0]}; see `{prog} --help` for the flags")
    if rest and not positional:
        raise ValueError(f"unexpected argument {rest[0]!r}; {prog} takes --flags only (see `{prog} --help`)")
    if rest:
        if any(arg in (f"--{positional}", f"--{positional.replace('_', '-')}") for arg in argv):
            raise ValueError(f"{positional}: give them as leading words or as --{positional}, not both")
        setattr(cfg, positional, rest)
    if show:
        print(json.dumps(config_dict(cfg), indent=2, ensure_ascii=False, default=str))
        raise SystemExit(0)
    return cfg


def _config_path(argv: list) -> str | None:
    if "--config" not in argv:
        return None
    index = argv.index("--config")
    if index + 1 == len(argv) or argv[index + 1].startswith("-"):
        raise ValueError("--config: give a YAML file, e.g. --config run.yaml")
    if not os.path.isfile(argv[index + 1]):
        raise FileNotFoundError(f"--config {argv[index + 1]}: no such file")
    return argv[index + 1]


def _parser_class():
    from trl import TrlParser

    class Parser(TrlParser):
        def __init__(self, *args, **kwargs):
            self.lists = {}  # dest -> (action, element type) of the list fields that take "a,b"
            super().__init__(*args, **kwargs)

        def parse_known_args(self, args=None, namespace=None):
            namespace, extras = super().parse_known_args(args, namespace)
            for dest, (action, kind) in self.lists.items():
                value = getattr(namespace, dest, None)
                if value is not None:  # flags, YAML lists and YAML "a,b" strings alike
                    setattr(namespace, dest, [self._item(action, kind, x) for item in
                                              ([value] if isinstance(value, str) else value)
                                              for x in (item.split(",") if isinstance(item, str) else [item])
                                              if not isinstance(x, str) or x.strip()])
            return namespace, extras

        def _item(self, action, kind, text):
            try:
                return kind(text.strip()) if isinstance(text, str) else text
            except ValueError:
                self.error(f"argument {'/'.join(action.option_strings)}: invalid {kind.__name__} value: {text!r}")

    return Parser


def dispatch(prog: str, doc: str, sub_verbs: dict, argv) -> int:
    """`prog SUB ...`: run `sub_verbs[SUB][1](rest)`; `--help` lists them ({name: (help, function)})."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in sub_verbs:
        return sub_verbs[argv[0]][1](argv[1:])
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: {prog} {{{','.join(sub_verbs)}}} [--config RUN.yaml] [--FIELD VALUE ...]\n\n{doc}\n\n"
              "sub-verbs:\n" + "".join(f"  {name:10} {text}\n" for name, (text, _) in sub_verbs.items())
              + f"\n`{prog} <sub-verb> --help` lists its flags.")
        raise SystemExit(0)
    what = f"unknown sub-verb {argv[0]!r}" if argv else "missing sub-verb"
    raise ValueError(f"{what}; choose one of {', '.join(sub_verbs)} (e.g. `{prog} {next(iter(sub_verbs))} --help`)")
