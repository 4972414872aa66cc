"""Text in: the parallel corpus, training examples built from it, and real corpora to fetch.

- `corpus`: the canonical parallel corpus (JSONL groups), its validation, and every text ->
  token ids (`encode`), as training, priors, analysis and steering all see it.
- `train_data`: one training example per (group, language), labels on the response, the
  `sara_*` columns, and `SaraCollator`.
- `kolibri`: `sara corpus kolibri`, a real parallel corpus, offline.

May import `runtime` and itself; imported by everything above it.
"""
