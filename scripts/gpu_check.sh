#!/usr/bin/env bash
# The GPU acceptance run: on a machine with an NVIDIA GPU, build fastvid for that GPU, run every test
# (CUDA tests on CUDA tensors, Triton kernels compiled, not interpreted), then the quick benchmark on the
# GPU, and print a summary. Budget: 8 minutes.
#   PYTHON=...   the interpreter whose torch to build against (default: .venv/bin/python if present,
#                else python3: a GPU image's own torch + triton are used as they are)
#   OUT=DIR      where logs go (default: build/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-build/gpu_check}
mkdir -p "$OUT"
unset TRITON_INTERPRET TORCH_CUDA_ARCH_LIST       # build for the visible GPU; compile Triton for real
export FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
start=$(date +%s)
status() { printf '%-10s %s\n' "$1" "$2" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

"$PYTHON" - <<'PY' | tee "$OUT/device.txt"
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
assert torch.cuda.is_available(), "no CUDA device visible: run this on a GPU machine"
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB",
          f"{p.multi_processor_count} SMs")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || { status device FAIL; exit 1; }

"$PYTHON" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1
build=$?
status build "$([ $build -eq 0 ] && echo ok || echo FAIL) ($(( $(date +%s) - start )) s; log $OUT/build.log)"
[ $build -eq 0 ] || { tail -30 "$OUT/build.log"; exit 1; }
"$PYTHON" -m fastvid info | tee "$OUT/info.txt"

FASTVID_EXPECT_CUDA_KERNELS=1 timeout 330 "$PYTHON" -m pytest -q -rs tests -p no:cacheprovider \
  > "$OUT/tests.log" 2>&1
tests=$?
status tests "$([ $tests -eq 0 ] && echo ok || echo "FAIL (exit $tests)"): $(tail -1 "$OUT/tests.log")"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20

timeout 120 "$PYTHON" -m fastvid bench --quick --device cuda --no-save > "$OUT/bench.log" 2>&1
bench=$?
status bench "$([ $bench -eq 0 ] && echo ok || echo "FAIL (exit $bench)") (log $OUT/bench.log)"
cat "$OUT/bench.log" | tail -60
status total "$(( $(date +%s) - start )) s"
[ $build -eq 0 ] && [ $tests -eq 0 ] && [ $bench -eq 0 ]
