"""The CUDA kernels executed on the CPU (DESIGN.md, testing layer 2).

The kernel bodies live in csrc/*/*_cuda_kernels.cuh, which need no CUDA runtime;
csrc/cuda_emulation/cuda_host_shim.h runs their grids on the CPU (threadIdx/blockIdx, __shared__
per block, __syncthreads as a barrier). The C++ tests in tests/cuda_emulation/ compare every kernel
with a double-precision oracle for fp32, fp64, bf16 and fp16, on grids small enough that the
grid-stride loops wrap, with NaN frames around every operand, built with AddressSanitizer and
UndefinedBehaviorSanitizer. Missing g++ or torch headers fail these tests: they are never skipped.
"""
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = {
    "recurrent": "tests/cuda_emulation/test_recurrent_cuda.cpp",
    "depthwise3d": "tests/cuda_emulation/test_depthwise3d_cuda.cpp",
}
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def _torch_include_dirs():
    # Read from the installed torch without importing it into this process's state twice; the
    # headers are needed for c10::BFloat16/Half and at::opmath_type only (nothing is linked).
    from torch.utils.cpp_extension import include_paths
    dirs = include_paths()
    assert any(os.path.isfile(os.path.join(d, "c10", "util", "BFloat16.h")) for d in dirs), \
        f"torch C++ headers not found in {dirs}"
    return dirs


def _compile(name, source, out_dir, include_dirs):
    gxx = shutil.which("g++")
    assert gxx, "g++ is required to build the emulated CUDA tests"
    binary = os.path.join(out_dir, name)
    cmd = [gxx, "-std=c++20", "-O1", "-g", *SANITIZERS, "-pthread",
           "-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(ROOT, "tests", "cuda_emulation"),
           *[f"-I{d}" for d in include_dirs], os.path.join(ROOT, source), "-o", binary]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"compiling {source} failed:\n{proc.stderr[-6000:]}"
    return binary


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("cuda_emulation"))
    include_dirs = _torch_include_dirs()
    with ThreadPoolExecutor(max_workers=2) as pool:  # one g++ per core
        futures = {name: pool.submit(_compile, name, src, out_dir, include_dirs) for name, src in SOURCES.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("family", sorted(SOURCES))
def test_emulated_cuda_kernels(binaries, family):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    proc = subprocess.run([binaries[family]], capture_output=True, text=True, env=env, timeout=600)
    output = proc.stdout + proc.stderr
    sys.stdout.write(output[-3000:])
    assert proc.returncode == 0, f"emulated CUDA {family} kernels failed:\n{output[-6000:]}"
    assert " 0 failures" in proc.stdout and "ERROR: AddressSanitizer" not in output, output[-6000:]
