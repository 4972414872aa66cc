"""Where do languages route apart? Cross-lingual routing analysis of a frozen model.

- `analyze`: `sara analyze`, routing divergence per MoE layer, `recommended_layers`.
- `maps`: streaming sums of pooled/dispatched routing per (language, layer, expert), metrics.
- `hidden_alignment`: hidden-state alignment per decoder layer, beside the routing maps.
- `plots`: the files `analyze` writes (analysis.json, analysis.csv, PNGs).

May import the core (`routing`, `divergence`), `architectures`, `data`, `runtime`; never
`evaluation`, `reporting`, `testbed` or `experiment` (tests/test_imports.py).
"""
