"""How good is a model per language: eval items, scoring, the lm-eval bridge, paired tests.

- `items`: eval JSONL sets (multiple choice, generation), prompts, answer extraction.
- `evaluate`: `sara eval`, per-language accuracy (log-likelihood MC, generation), steering
  specs applied at inference.
- `lm_eval_bridge`: the same items through lm-evaluation-harness (task YAMLs in `lm_eval_tasks/`).
- `paired_tests`: paired bootstrap and McNemar over items.

May import `steering`, `analysis`, the core, `architectures`, `data`, `runtime`; never
`reporting`, `testbed` or `experiment`.
"""
