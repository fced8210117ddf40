#!/usr/bin/env bash
# Creates .venv (pinned torch + tools) and builds fastvid in it (editable). Idempotent.
#   FASTVID_CPU_ONLY=1        skip the CUDA kernels
#   TORCH_CUDA_ARCH_LIST=...  CUDA archs to build (default 9.0 here: one arch keeps the build short)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -m fastvid info
