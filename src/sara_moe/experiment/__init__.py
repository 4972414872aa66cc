"""The study on testbed worlds: worlds x arms x seeds, dev-only selection, the report it writes.

- `design`: world kinds, arms, eval splits, the world-validity rule (one home for each constant).
- `arms`: what each arm trains with and how its models are scored (control priors, cloze
  scoring, the steer arm).
- `report`: comparisons with paired tests, and the sentences generated from them.
- `run`: `run_experiment`, the grid over worlds, arms and seeds, with its run cache.
- `select`: dev-only recipe selection and the recipe search.
- `demo`: `sara demo`, a thin preset over `run`.

Research behind the boundary: the top of the house. It may import anything below; nothing
imports it (tests/test_imports.py).
"""
