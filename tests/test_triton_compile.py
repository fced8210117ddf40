"""Every Triton kernel compiled (not interpreted) for real GPU targets, without a GPU.

For each architecture (sm_80, sm_86/89, sm_90, sm_100) a subprocess without TRITON_INTERPRET runs
tests/_triton_compile.py: the launchers run on CPU tensors with the launch replaced by a recorder and
the arch's shared-memory limit, so each recorded launch is exactly what the launcher would launch on
that GPU (launch_config's tiles, num_warps, num_stages, constexprs); each is compiled with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` and the ptxas bundled with Triton, into
a fresh cache (nothing is reused across runs). Checks: it compiles; its shared memory fits the
arch; for attention, within the model launch_config sized the tiles with; index math is 64-bit.

Interpreter runs that take a different code path than the GPU (tests/test_triton_*.py run under
TRITON_INTERPRET=1 on CPU tensors):
* FIX_BF16 (all families): bf16 stores round to nearest even by hand (the interpreter's cast
  truncates); the GPU variant casts with ``.to``;
* WIDEN (attention): bf16 ``tl.dot`` operands widened to fp32 (the interpreter would multiply bf16
  bit patterns); the GPU variant feeds bf16 to the tensor cores.
The compiled variants here are the GPU ones (FIX_BF16 = WIDEN = False): asserted below.

The minimum Triton release (fastvid.triton_kernels.MIN_TRITON_VERSION) is checked the same way,
opt-in: install it apart (``pip install --no-deps --target DIR triton==3.6.0``: a 188 MB wheel,
642 MB installed) and set FASTVID_TRITON_MIN_PATH=DIR.

Cost: a compile takes 1-50 s (fp32 attention, whose ``ieee`` products are FMA loops, is the
slowest), so by default each arch compiles a slice of the cases (every dtype, every family, every
arch covered; DEFAULT_CASES); FASTVID_TRITON_COMPILE=all compiles every case on every arch.
"""
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("triton")

from fastvid.triton_kernels import attention as ta  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ARCHS = [80, 86, 89, 90, 100]

# Per arch: the slice compiled by default. Every family and dtype is covered somewhere; fp32
# attention (the slowest to compile) on sm_89, the smallest shared memory; fp16 D = 128 on sm_100,
# where wgmma/tcgen05 operand buffers make shared memory largest relative to the tiles; the head-dim
# chunked paths (D = 512, D != Dv) on sm_80 and sm_100; the fused ConvLSTM/ConvGRU step kernel
# (recurrent_conv) in every dtype on sm_80 (mma) and sm_90 (wgmma).
DEFAULT_CASES = {
    80: ["attention-bf16-D512-Dv512", "recurrent-fp32", "recurrent_conv-fp16", "recurrent_conv-bf16",
         "recurrent_conv-fp32", "recurrent_conv-fp64", "recurrent_norm-bf16"],
    86: ["depthwise-fp16-k333", "depthwise-fp32-k333-m2", "recurrent-bf16"],
    89: ["attention-fp32-D128-Dv128", "attention-fp16-D40-Dv200"],
    90: ["attention-fp64-D128-Dv128", "attention-bf16-D128-Dv128", "depthwise-bf16-k333",
         "recurrent-fp64", "recurrent_conv-fp16", "recurrent_conv-bf16", "recurrent_conv-fp32", "recurrent_conv-fp64",
         "recurrent_norm-fp32"],
    100: ["attention-fp16-D128-Dv128", "attention-fp16-D512-Dv512", "depthwise-fp64-k333",
          "recurrent-fp16", "recurrent_norm-fp64"],
}


def _cases(arch):
    if os.environ.get("FASTVID_TRITON_COMPILE") == "all":
        out = subprocess.run([sys.executable, "-c", "import _triton_compile as c; print(' '.join(c.CASES))"],
                             cwd=HERE, env=_env(None), capture_output=True, text=True, check=True)
        return out.stdout.split()
    return DEFAULT_CASES[arch]


def _env(cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    return env


def _run_helper(arch, cases, cache, pythonpath=None):
    env = _env(cache)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_triton_compile.py"), str(arch), *cases],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"sm_{arch}: compile helper failed:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{arch: [record, ...]}: every arch's cases compiled, two subprocesses at a time."""
    # The cache folders are made here, not in the threads: tmp_path_factory is not thread-safe (two
    # threads making its base folder at once failed on a 16-core machine).
    caches = {arch: tmp_path_factory.mktemp(f"triton-cache-sm{arch}") for arch in ARCHS}
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(ARCHS, pool.map(lambda arch: _run_helper(arch, _cases(arch), caches[arch]), ARCHS)))


def _label(r):
    meta = {k: v for k, v in r["meta"].items() if k.isupper() or k.startswith("num_")}
    return f"{r['case']} {r['kernel']} {meta}"


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_and_fit_shared_memory(compiled, arch):
    records = compiled[arch]
    families = {r["case"].split("-")[0] for r in records}
    assert records and families <= {"attention", "depthwise", "recurrent", "recurrent_conv", "recurrent_norm"}
    for r in records:
        assert "error" not in r, f"sm_{arch}: {_label(r)} does not compile: {r.get('error')}"
        assert r["shared"] <= r["limit"], f"sm_{arch}: {_label(r)} needs {r['shared']} bytes of shared " \
                                          f"memory, the arch has {r['limit']}"
        # The GPU variant, not the interpreter's (see the module docstring).
        assert not r["meta"].get("FIX_BF16") and not r["meta"].get("WIDEN"), _label(r)


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_shared_memory_within_launch_config_model(compiled, arch):
    """launch_config sizes tiles by ta._shared_bytes; the compiled kernels must not need more, or
    head dims not compiled here could get tiles that do not fit."""
    kernels = {"_attn_fwd_kernel": "fwd", "_attn_bwd_delta_kernel": "delta",
               "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}
    checked = 0
    for r in compiled[arch]:
        if r["kernel"] not in kernels or "error" in r:
            continue
        m = r["meta"]
        elem = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}[r["case"].split("-")[1]]
        bound = ta._shared_bytes(kernels[r["kernel"]], m["BLOCK_N"], m.get("BLOCK_M", 16),
                                 m.get("BLOCK_D", 16), m["BLOCK_DV"], elem, r["capability"])
        assert r["shared"] <= bound, f"sm_{arch}: {_label(r)} uses {r['shared']} bytes, model says {bound}"
        checked += 1
    assert checked or not any(c.startswith("attention") for c in _cases(arch))


@pytest.mark.parametrize("arch", [80, 90])
def test_recurrent_conv_shared_memory_within_launch_config_model(compiled, arch):
    """The fused ConvLSTM/ConvGRU step kernels (and the Ballas GRU's two), every dtype, on sm_80 and
    sm_90: their compiled shared memory is within the model recurrent_conv.launch_config sized the
    tiles with."""
    from fastvid.triton_kernels import recurrent_conv as trc

    kernels = {"_conv_cell_step_kernel", "_ballas_reset_kernel", "_ballas_cell_kernel"}
    records = [r for r in compiled[arch] if r["kernel"] in kernels]
    assert {r["kernel"] for r in records} == kernels
    assert {r["case"] for r in records} == {f"recurrent_conv-{d}" for d in ("fp16", "bf16", "fp32", "fp64")}
    for r in records:
        assert "error" not in r, f"sm_{arch}: {_label(r)}: {r['error']}"
        m = r["meta"]
        elem = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}[r["case"].split("-")[1]]
        gates = 4 if r["kernel"] == "_conv_cell_step_kernel" and not m["IS_GRU"] else 3  # launch_config's cell
        bound = trc._shared_bytes(gates, m["BLOCK_M"], m["BLOCK_C"], m["BLOCK_K"], elem, m["num_stages"],
                                  r["capability"])
        assert r["shared"] <= bound, f"sm_{arch}: {_label(r)} uses {r['shared']} bytes, model says {bound}"


# `%x = arith.muli %a, %b : i32` (or a tensor of i32), and `%c = arith.constant ...` in TTIR.
_MUL = re.compile(r"= arith\.muli (%[\w.#]+), (%[\w.#]+) : (i32|tensor<[\dx]+xi32\b)")
_CONSTANT = re.compile(r"(%[\w.#]+) = arith\.constant ")


@pytest.mark.parametrize("arch", ARCHS)
def test_index_math_is_64_bit(compiled, arch):
    """No product of two runtime values in 32 bits in any kernel (products with a constant, like
    tap × dilation, are bounded by the kernel size). Catches e.g. recurrent's old C*HW in int32."""
    for r in compiled[arch]:
        if "error" in r:
            continue
        constants = set(_CONSTANT.findall(r["ttir"]))
        for line in r["ttir"].splitlines():
            m = _MUL.search(line)
            if m and m.group(1) not in constants and m.group(2) not in constants:
                pytest.fail(f"sm_{arch}: {_label(r)} multiplies in int32: {line.strip()}")


@pytest.mark.skipif(not os.environ.get("FASTVID_TRITON_MIN_PATH"),
                    reason="set FASTVID_TRITON_MIN_PATH to a --target install of the minimum Triton")
@pytest.mark.parametrize("arch", [80, 90])
def test_minimum_triton_version_compiles(tmp_path, arch):
    from fastvid.triton_kernels import MIN_TRITON_VERSION

    path = os.environ["FASTVID_TRITON_MIN_PATH"]
    probe = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"],
                           env={**_env(None), "PYTHONPATH": path}, capture_output=True, text=True, check=True)
    assert tuple(int(x) for x in probe.stdout.strip().split(".")[:2]) == MIN_TRITON_VERSION
    cases = ["attention-fp64-D128-Dv128", "attention-bf16-D512-Dv512", "depthwise-fp32-k333",
             "recurrent-bf16"]
    records = _run_helper(arch, cases, tmp_path, pythonpath=path)
    assert {r["case"] for r in records} == set(cases)
    for r in records:
        assert "error" not in r, f"triton {probe.stdout.strip()} sm_{arch}: {_label(r)}: {r.get('error')}"
        assert r["shared"] <= r["limit"], _label(r)
