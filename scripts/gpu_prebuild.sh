#!/usr/bin/env bash
# Builds fastvid._C here, for another machine's Python and torch (a GPU lease machine, where building
# ran past 5 minutes of its 15), and leaves the stripped library in fastvid/, where
# `PREBUILT=1 scripts/gpu_check.sh` there uses it instead of building. No GPU needed here: nvcc and a
# CUDA build of torch are. Defaults: the H200 lease image seen on 2026-12-04 (Python 3.12, torch
# 2.11.0+cu130, sm_90).
#   PYTHON=python3.12  TORCH_VERSION=2.11.0  TORCH_CUDA_ARCH_LIST=9.0
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.12}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
work=build/gpu_prebuild/$("$PYTHON" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')-torch$TORCH_VERSION
[ -x "$work/venv/bin/python" ] || "$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "torch==$TORCH_VERSION" ninja numpy "setuptools>=64" wheel
"$work/venv/bin/python" setup.py -q build_ext --build-lib "$work/lib" --build-temp "$work/temp" > "$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log"; exit 1; }
built=$(ls "$work"/lib/fastvid/_C*.so)
strip --strip-debug -o "fastvid/$(basename "$built")" "$built"
echo "fastvid/$(basename "$built") ($(du -h "fastvid/$(basename "$built")" | cut -f1)); on the GPU machine:"
echo "  PREBUILT=1 bash scripts/gpu_check.sh   (carry fastvid/$(basename "$built"))"
