"""What every stage runs on: options, published files, checkpoints, model loading, ranks.

- `options`: `parse_config` (a verb's config dataclass from `--config` YAML, then flags) and
  `dispatch` for sub-verbs.
- `artifacts`: atomic publishing, the overwrite rule, hashes, run metadata, resolved configs.
- `checkpoints`: the training `output_dir` rules (refuse, overwrite, resume).
- `loading`: model + tokenizer loading as every verb does it; `pad_batch`, the one padding path.
- `distributed`: rank, work shares, sums to the main process, `global_mean`.

The floor of the house: it imports nothing of sara-moe but `data.corpus` (the plain
template a fingerprint hashes, the encoding `loading` checks) and itself.
"""
