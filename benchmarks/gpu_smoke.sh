#!/usr/bin/env bash
# GPU smoke path of issue 14: the whole SARA line on a ~1B random Qwen3-MoE, bf16, one CUDA GPU.
#
#   bash benchmarks/gpu_smoke.sh [--output results.json] [--checkpointing] [--no-qlora]
#   bash benchmarks/gpu_smoke.sh --tiny            # the same steps on a tiny model, any device (script check)
#
# Runs `sara analyze`, `sara priors`, 20 steps of SFT and of SARA (cached priors), and the same
# two arms under QLoRA when bitsandbytes is importable; prints SARA/SFT step-time and
# peak-memory ratios (goal <= 1.02 each). Never run in CI. Copy the printed lines, the card
# and the versions into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ " $* " != *" --tiny "* ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_smoke: torch sees no CUDA device (use --tiny to check the script on CPU)')"
fi
"$PY" -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"
"$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>/dev/null || echo "bitsandbytes absent: QLoRA arms skipped"
exec "$PY" benchmarks/gpu_smoke.py "$@"
