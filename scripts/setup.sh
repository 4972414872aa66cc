#!/usr/bin/env bash
# Create .venv with the CPU torch wheel pinned first (a looser torch pulls a multi-GB CUDA build),
# then install sara-moe with its test extras under the pinned constraints. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -c .ci/constraints.txt -e ".[test,eval]"
