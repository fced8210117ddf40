#!/usr/bin/env bash
# Developer rebuild of fastvid._C into the source tree. Builds under build/ and renames the new
# library into place, so processes that have the old one loaded (running tests) are not disturbed.
# TORCH_CUDA_ARCH_LIST as in setup.sh (export TORCH_CUDA_ARCH_LIST=9.0 for a quick one-arch rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
.venv/bin/python setup.py -q build_ext > build/rebuild.log 2>&1 || { tail -40 build/rebuild.log; exit 1; }
built=$(ls -t build/lib.*/fastvid/_C*.so | head -1)
cp "$built" "fastvid/.$(basename "$built").new"
mv "fastvid/.$(basename "$built").new" "fastvid/$(basename "$built")"
# Import it: an undefined symbol links fine and shows only here (fastvid would fall back to the reference).
.venv/bin/python -W ignore -c "import sys, fastvid; e = fastvid.info()['extension_error']; sys.exit(f'fastvid._C does not load: {e}' if e else 0)"
echo "rebuilt fastvid/$(basename "$built")"
