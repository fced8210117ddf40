"""CPU ISA dispatch (csrc/cpu_isa.h): every vectorised CPU kernel has an AVX-512, an AVX2+FMA and a
baseline path; the active one can be forced (FASTVID_CPU_ISA at import, torch.ops.fastvid._set_cpu_isa
at run time) but never above what the CPU supports; the kernels report the path they ran; reductions
do not depend on the thread count on any path. Value parity of every kernel under every path is in
the family tests (their `cpu_isa` fixture, tests/_isa.py)."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _isa import CPU_ISA_PATHS, cpu_isa, forced_isa, supported_paths  # noqa: F401 (cpu_isa: fixture)

import fastvid

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")

OPS = torch.ops.fastvid
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def run_every_family():
    """One call of a depthwise (both layouts), a recurrent and an attention CPU kernel."""
    x = torch.randn(1, 4, 3, 5, 20)
    w = torch.randn(4, 1, 3, 3, 3)
    for inp in (x, x.contiguous(memory_format=torch.channels_last_3d)):
        OPS.depthwise_conv3d(inp, w, None, [1, 1, 1], [1, 1, 1], [1, 1, 1])
    OPS.lstm_cell(torch.randn(2, 16, 3, 3), torch.randn(2, 4, 3, 3), None)
    q = torch.randn(1, 20, 8)
    OPS.nonlocal_attention(q, q, q, 0.3)


def test_info_reports_the_paths():
    info = fastvid.info()
    supported = info["cpu_isa_supported"]
    assert supported == list(CPU_ISA_PATHS[:len(supported)]) and supported, supported
    assert info["cpu_isa"] in supported
    for family in ("depthwise3d", "recurrent", "attention"):
        assert info[f"cpu_isa_{family}"] == info["cpu_isa"]
    flags = cpuinfo_flags()
    if flags is not None and sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        avx2 = {"avx2", "fma", "f16c", "bmi1", "bmi2"} <= flags  # what the AVX2 path is compiled for
        avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags
        assert supported[-1] == ("avx512" if avx512 else "avx2" if avx2 else "baseline")
        assert info["cpu_isa_bf16"] == (avx512 and "avx512_bf16" in flags)


def sysfs_cache_bytes(level):
    """CPU 0's data or unified cache of `level` as Linux's sysfs lists it (what lscpu shows), or None."""
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(f"{index}/level") as f, open(f"{index}/type") as t, open(f"{index}/size") as s:
                found_level, kind, size = int(f.read()), t.read().strip(), s.read().strip()
        except (OSError, ValueError):
            continue
        if found_level == level and kind != "Instruction":
            units = {"K": 1024, "M": 1024 ** 2}
            return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return None


def getconf_bytes(name):
    if shutil.which("getconf") is None:
        return None
    out = subprocess.run(["getconf", name], capture_output=True, text=True)
    return int(out.stdout) if out.returncode == 0 and out.stdout.strip().isdigit() else 0


def test_info_reports_the_cache_sizes_the_os_reports():
    # sysfs first: glibc's getconf can name another cache (320 MiB, a whole AMD EPYC package's L3, on a
    # VM whose cores each share one 32 MiB L3).
    expected = {}
    for key, level, name in (("cpu_l2_bytes", 2, "LEVEL2_CACHE_SIZE"), ("cpu_last_level_cache_bytes", 3, "LEVEL3_CACHE_SIZE")):
        sysfs = sysfs_cache_bytes(level)
        expected[key] = sysfs if sysfs else getconf_bytes(name)
    if None in expected.values():
        pytest.skip("neither sysfs nor getconf says the cache sizes")
    info = fastvid.info()
    assert {key: info[key] for key in expected} == expected


def test_forcing_selects_the_path_the_kernels_run(cpu_isa):
    assert OPS._cpu_isa() == cpu_isa
    run_every_family()
    for family in ("depthwise3d", "recurrent", "attention"):
        assert OPS._cpu_isa_ran(family) == cpu_isa, family


def test_a_path_the_cpu_lacks_cannot_be_forced():
    best, active = OPS._cpu_isa_supported(), OPS._cpu_isa()  # active < best under FASTVID_CPU_ISA
    with pytest.raises(RuntimeError, match="isa must be one of"):
        OPS._set_cpu_isa("avx10")
    if best == "baseline":
        lower = None
    else:
        lower = CPU_ISA_PATHS[CPU_ISA_PATHS.index(best) - 1]
    if lower is None:
        pytest.skip("the CPU only has the baseline path")
    # Behave as a CPU whose best path is one below this one's.
    try:
        OPS._cpu_isa_simulate(lower)
        assert OPS._cpu_isa_supported() == lower
        clamped = min(active, lower, key=CPU_ISA_PATHS.index)  # a path forced below `lower` stays
        assert OPS._cpu_isa() == clamped
        with pytest.raises(RuntimeError, match=f"'{best}' is not supported by this CPU"):
            OPS._set_cpu_isa(best)
        assert fastvid.info()["cpu_isa_supported"][-1] == lower
        run_every_family()
        assert OPS._cpu_isa_ran("depthwise3d") == clamped
    finally:
        OPS._cpu_isa_simulate("")
        OPS._set_cpu_isa(active)  # the process's path, so later tests keep running on it
    with pytest.raises(RuntimeError, match="_cpu_isa_simulate"):
        OPS._cpu_isa_simulate("avx10")


_SWITCH_DURING_ATTENTION = """
import threading, time, torch, fastvid
ops, paths = torch.ops.fastvid, {paths!r}
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, n, 16, generator=g, requires_grad=True) for n in (1000, 250, 250))
expected = fastvid.ops.nonlocal_attention(q, k, v).detach()
stop = threading.Event()

def switch():
    i = 0
    while not stop.is_set():
        ops._set_cpu_isa(paths[i % len(paths)])
        i += 1
        time.sleep(0.0002)

switcher = threading.Thread(target=switch)
switcher.start()
worst = 0.0
for _ in range(600):
    out = fastvid.ops.nonlocal_attention(q, k, v)
    out.sum().backward()
    worst = max(worst, (out - expected).abs().max().item())
stop.set()
switcher.join()
print(worst)
"""


@pytest.mark.skipif(len(supported_paths()) < 2, reason="one ISA path on this CPU: nothing to switch between")
def test_switching_the_path_while_attention_runs():
    """_set_cpu_isa from another thread while the attention op runs: the op keeps one path for its whole call
    (cpu_isa::pin_path) and the switch waits for it. Before, a call sized its packed operands for one path's
    panel width and ran another path's kernels on them: glibc aborted ("double free or corruption",
    "malloc_consolidate(): invalid chunk size") in 3 of 3 runs of these 600 calls. A subprocess, as a heap
    corruption would take the test process down."""
    proc = subprocess.run([sys.executable, "-c", _SWITCH_DURING_ATTENTION.format(paths=supported_paths())], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) < 1e-5  # every path's result within fp32 rounding of the first


def _import_with_env(value):
    env = dict(os.environ, FASTVID_CPU_ISA=value)
    code = ("import sys, torch, fastvid; sys.path.insert(0, 'tests'); from test_cpu_isa import run_every_family; "
            "run_every_family(); ops = torch.ops.fastvid; "
            "print(ops._cpu_isa(), ops._cpu_isa_ran('depthwise3d'), fastvid.info()['cpu_isa_forced'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split(), proc.stderr


@pytest.mark.parametrize("isa", supported_paths())
def test_env_variable_read_at_import(isa):
    (active, ran, forced), _ = _import_with_env(isa)
    assert (active, ran, forced) == (isa, isa, isa)


def test_env_variable_ignores_case_and_spaces():
    """' AVX2 ' asks for the AVX2 path as 'avx2' does (before: an unknown name, warned about on stderr, and
    the best path ran: the opposite of the lower path asked for, while info() reported 'AVX2' as forced)."""
    want = "avx2" if "avx2" in supported_paths() else "baseline"
    (active, ran, forced), stderr = _import_with_env(f" {want.upper()} ")
    assert (active, ran, forced) == (want, want, want), stderr


def test_info_reports_the_request_made_at_import(monkeypatch):
    """cpu_isa_forced is the FASTVID_CPU_ISA the kernels saw when fastvid loaded; setting the variable later
    changes no path, and info() no longer re-reads it (it reported a forced path not in effect)."""
    before = fastvid.info()
    monkeypatch.setenv("FASTVID_CPU_ISA", "baseline" if before["cpu_isa_forced"] != "baseline" else "avx2")
    after = fastvid.info()
    assert (after["cpu_isa_forced"], after["cpu_isa"]) == (before["cpu_isa_forced"], before["cpu_isa"])


def test_env_variable_unknown_or_unsupported_is_clamped_with_a_warning():
    best = OPS._cpu_isa_supported()
    (active, _, _), stderr = _import_with_env("sse9")
    assert active == best and "FASTVID_CPU_ISA=sse9 is not one of" in stderr
    if best == "avx512":
        pytest.skip("every path is supported here: the clamp of an unsupported request is tested by "
                    "test_a_path_the_cpu_lacks_cannot_be_forced")
    (active, _, _), stderr = _import_with_env("avx512")
    assert active == best and f"this CPU supports at most {best}" in stderr


# ------------------------------------------------------------------ thread-count independence
DEPTHWISE_CASES = [  # (layout, C, multiplier, dtype): the NCDHW kernels, channels_last_3d m = 1 / 2
    ("contiguous", 5, 1, torch.float32),
    ("contiguous", 3, 2, torch.float32),  # m > 1 runs the channels-last kernels
    ("channels_last_3d", 40, 1, torch.float32),
    ("channels_last_3d", 40, 1, torch.bfloat16),
    ("channels_last_3d", 6, 2, torch.float64),
]


@pytest.mark.parametrize("layout,C,m,dtype", DEPTHWISE_CASES)
def test_depthwise_gradients_do_not_depend_on_the_thread_count(cpu_isa, layout, C, m, dtype):
    """All three depthwise gradients are bit-identical for 1, 2 and 3 threads (the weight/bias
    reductions are split by the shape, never by the thread count)."""
    x = torch.randn(2, C, 5, 9, 24, dtype=dtype)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(C * m, 1, 3, 3, 3, dtype=dtype)
    args = ([1, 1, 1], [1, 1, 1], [1, 1, 1])
    go = torch.randn(OPS.depthwise_conv3d(x, w, None, *args).shape, dtype=dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(OPS.depthwise_conv3d_backward(go, x, w, *args, [True, True, True]))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for name, a, b in zip(("input", "weight", "bias"), results[0], other):
            assert torch.equal(a, b), f"grad {name} differs between thread counts"
    assert OPS._cpu_isa_ran("depthwise3d") == cpu_isa
    ref = torch.nn.grad.conv3d_weight(x.double(), w.shape, go.double(), *args, groups=C)
    tol = 1e-12 if dtype == torch.float64 else 1e-4 * ref.abs().max().item()  # fp32 sums of 2160 products
    if dtype == torch.bfloat16:  # plus the one rounding to bf16: half an ulp, at most 2^-8 |value|
        tol = tol + 2.0 ** -8 * ref.abs()
    err = (results[0][1].double() - ref).abs()
    assert (err <= tol).all(), f"grad weight off by {err.max().item():.3g}"


# ------------------------------------------------------------------ per-ISA code really is per ISA
def _functions_by_namespace(path):
    """{isa: set of instruction register classes used} over the functions of each isa_<path> namespace,
    plus 'other' for every function outside them."""
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", path], capture_output=True, text=True,
                          check=True).stdout
    used = {name: set() for name in ("isa_avx512", "isa_avx2", "isa_baseline", "other")}
    current = "other"
    for line in dump.splitlines():
        if line.endswith(">:") and "<" in line:
            name = line[line.index("<") + 1:-2]
            current = next((ns for ns in ("isa_avx512", "isa_avx2", "isa_baseline") if f"::{ns}::" in name), "other")
            continue
        for reg in ("%zmm", "%ymm"):
            if reg in line:
                used[current].add(reg)
    return used


@pytest.mark.skipif(shutil.which("objdump") is None or os.uname().machine != "x86_64",
                    reason="needs objdump and an x86-64 build")
def test_baseline_and_avx2_code_has_no_wider_registers():
    """No ymm/zmm outside the AVX2 / AVX-512 namespaces, no zmm in the AVX2 one (an inline function
    emitted under two ISAs would be merged by the linker and could run AVX-512 code on an AVX2 CPU)."""
    import fastvid._C as ext
    used = _functions_by_namespace(ext.__file__)
    assert used["isa_baseline"] == set(), used
    assert used["other"] == set(), used
    assert used["isa_avx2"] == {"%ymm"}, used
    assert "%zmm" in used["isa_avx512"], used


# ------------------------------------------------------------------ channels-last sweep variants
@pytest.mark.parametrize("kernel,stride,dilation", [
    ((1, 3, 3), (1, 1, 1), (1, 1, 1)),  # forward and input gradient: taps one position apart
    ((1, 1, 5), (1, 1, 1), (1, 1, 1)),
    ((1, 1, 3), (1, 1, 2), (1, 1, 2)),  # forward: taps one stride apart (W stride = dilation)
    ((1, 1, 5), (1, 1, 2), (1, 1, 1)),  # the general sweep
    ((1, 1, 7), (1, 1, 1), (1, 1, 1)),
], ids=["k3", "k5", "k3s2d2", "k5s2", "k7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_channels_last_interior_sweeps(cpu_isa, kernel, stride, dilation, dtype):
    """The channels_last_3d kernels' interior sweeps (register-reused source vectors for kernel widths
    3 and 5, the general loop otherwise; channel blocks of 2, 1 vectors and a scalar tail on every
    vector width) against F.conv3d in float64: forward and input gradient."""
    C = 2 * 16 + 16 + 3  # a 2-vector bf16 block, a 1-vector block and a tail at 64-byte vectors
    x = torch.randn(1, C, 2, 3, 29, dtype=torch.float64)
    w = torch.randn(C, 1, *kernel, dtype=torch.float64) / kernel[2]
    b = torch.randn(C, dtype=torch.float64)
    padding = tuple(k // 2 * d for k, d in zip(kernel, dilation))
    xs = x.to(dtype).contiguous(memory_format=torch.channels_last_3d)
    out = OPS.depthwise_conv3d(xs, w.to(dtype), b.to(dtype), list(stride), list(padding), list(dilation))
    exact = F.conv3d(xs.double(), w.to(dtype).double(), b.to(dtype).double(), stride, padding, dilation, groups=C)
    go = torch.randn(exact.shape, dtype=torch.float64).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    gi = OPS.depthwise_conv3d_backward(go, xs, w.to(dtype), list(stride), list(padding), list(dilation),
                                       [True, False, False])[0]
    gi_exact = torch.nn.grad.conv3d_input(xs.shape, w.to(dtype).double(), go.double(), stride, padding, dilation,
                                          groups=C)
    assert OPS._cpu_isa_ran("depthwise3d") == cpu_isa
    # Bound per element, from Σ|terms| (|x|·|w| products, plus |bias|): fp32/fp64 accumulation errs by
    # a few ulps of it; bf16 adds the final rounding to bf16 (half an ulp: 2^-8 relative).
    u = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53, torch.bfloat16: 2.0 ** -24}[dtype]
    wd, bd = w.to(dtype).double().abs(), b.to(dtype).double().abs()
    terms_out = F.conv3d(xs.double().abs(), wd, bd, stride, padding, dilation, groups=C)
    terms_gi = torch.nn.grad.conv3d_input(xs.shape, wd, go.double().abs(), stride, padding, dilation, groups=C)
    for name, ours, ref, terms in (("output", out, exact, terms_out), ("grad_input", gi, gi_exact, terms_gi)):
        bound = 16 * u * terms + (2.0 ** -8 * ref.abs() if dtype == torch.bfloat16 else 0) + 1e-300
        err = (ours.double() - ref).abs()
        assert (err <= bound).all(), f"{name}: max error {err.max().item():.3g}, worst ratio {(err / bound).max():.3g}"


# ------------------------------------------------------------------ bf16 / fp16 loads and stores
def half_precision_values(dtype, n, generator):
    """n values of dtype, by bit pattern: about half subnormals of the dtype (the conversions' edge),
    the rest normal numbers of either sign; no zeros, infinities or NaNs."""
    subnormal_max = 0x03FF if dtype == torch.float16 else 0x007F  # exponent field 0
    subnormal = torch.randint(1, subnormal_max + 1, (n,), generator=generator, dtype=torch.int32)
    normal = torch.randn(n, generator=generator).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    bits = torch.where(torch.rand(n, generator=generator) < 0.5, subnormal, normal)
    bits = bits | torch.where(torch.rand(n, generator=generator) < 0.5, 0x8000, 0)
    return bits.to(torch.uint16).view(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["ncdhw", "cl3d"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_half_precision_loads_and_stores_round_as_pytorch(cpu_isa, dtype, layout, scale):
    """The vector loads that widen bf16 / fp16 to fp32 and the stores that round back (csrc/cpu_vec.h,
    per ISA path: vpmovzxwd + shift, F16C) are exact and round to nearest even as PyTorch's conversion,
    subnormals included: a depthwise conv whose only nonzero tap is `scale` at the centre computes
    x · scale exactly in fp32, so its output must equal (x.float() * scale).to(dtype) bit for bit
    (scale 0.5 makes every odd subnormal a rounding tie)."""
    g = torch.Generator().manual_seed(5)
    C = 2 * 16 + 16 + 3  # 2- and 1-vector blocks and a tail at every vector width
    x = half_precision_values(dtype, C * 3 * 4 * 21, g).view(1, C, 3, 4, 21)
    if layout == "cl3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w = torch.zeros(C, 1, 3, 3, 3, dtype=dtype)
    w[:, :, 1, 1, 1] = scale
    out = OPS.depthwise_conv3d(x, w, None, [1, 1, 1], [1, 1, 1], [1, 1, 1])
    assert OPS._cpu_isa_ran("depthwise3d") == cpu_isa
    expected = (x.float() * scale).to(dtype)
    mismatch = out.contiguous().view(torch.int16) != expected.contiguous().view(torch.int16)
    assert not mismatch.any(), (f"{int(mismatch.sum())} of {x.numel()} differ, e.g. input "
                                f"{x.contiguous()[mismatch][:4].tolist()} -> {out.contiguous()[mismatch][:4].tolist()}, "
                                f"expected {expected.contiguous()[mismatch][:4].tolist()}")
