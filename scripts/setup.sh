#!/usr/bin/env bash
# Creates .venv (pinned torch + tools) and builds fastvid in it (editable). Idempotent.
#   FASTVID_CPU_ONLY=1        skip the CUDA kernels
#   TORCH_CUDA_ARCH_LIST=...  CUDA archs to build (default: the visible GPU; without one, setup.py's
#                             DEFAULT_CUDA_ARCHS = 7.5 8.0 8.6 8.9 9.0 10.0 + PTX)
# With a CUDA toolkit (nvcc) present the CUDA kernels are required: a failed CUDA build fails set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
if [ "${FASTVID_CPU_ONLY:-0}" != "1" ] && command -v nvcc >/dev/null; then
  export FORCE_CUDA=1
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -m fastvid info
