"""The synthetic testbed: a cloned-language world, its corpora and eval sets, a tiny MoE pretrained on it.

    sara testbed build --output_dir runs/testbed
    sara testbed pretrain --testbed runs/testbed --output_dir runs/base

`world` (pure Python: persons, facts, languages), `build` (corpora, eval items, tokenizer),
`pretrain` (a tiny MoE trained from scratch, with the optional routing knob). Research code
behind the boundary: it may import the core, `architectures`, `data`, `runtime`; nothing in
the core imports it (tests/test_imports.py).
"""

from __future__ import annotations

from sara_moe.runtime.options import dispatch


def testbed_cli(argv=None) -> int:
    # imported on use: `pretrain` pulls in torch and the Trainer, `sara testbed build` needs neither
    from sara_moe.testbed.build import build_cli
    from sara_moe.testbed.pretrain import pretrain_cli

    return dispatch("sara testbed", __doc__.split("\n\n")[0], {
        "build": ("generate the world, corpora, eval sets and tokenizer", build_cli),
        "pretrain": ("pretrain a tiny MoE from scratch on a built testbed", pretrain_cli)}, argv)
