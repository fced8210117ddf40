"""Every raw ``torch.ops.fastvid.*`` op checks every tensor argument (shape, dtype, device) before
it takes a pointer (issue 9 pt 6, issue 10 "Inputs that cannot crash it").

Each op is called with valid arguments (built here, the caches by running the forward ops), then
with each tensor argument wrong in turn: an extra dimension, a wrong leading size, an integer
dtype, and the 'meta' device (which stands in for "another device" where CUDA is absent). The call
must raise an error whose message names that argument. Meta tensors would dispatch to the fake
kernels, so the wrong-device calls are redispatched to the CPU kernel: the C++ checks are what is
tested. test_raw_op_checks_under_asan rebuilds the CPU kernels with AddressSanitizer/UBSan into a
temp dir and reruns this file against them in a subprocess (LD_PRELOAD of the ASan runtime).
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import fastvid  # noqa: F401  (loads fastvid._C, registering the ops)
from _setup_py import setup_py_namespace

B, T, C_IN, C, H, W = 2, 3, 2, 3, 4, 5
PAD, DIL = [1, 1], [1, 1]


def _cell_cases():
    g4 = torch.randn(B, 4 * C, H, W)
    c_prev = torch.randn(B, C, H, W)
    peephole = torch.randn(3, C)
    _, c, gates = torch.ops.fastvid.lstm_cell(g4, c_prev, peephole)
    x3, h3, h_prev = torch.randn(B, 3 * C, H, W), torch.randn(B, 3 * C, H, W), torch.randn(B, C, H, W)
    _, cache = torch.ops.fastvid.gru_cell(x3, h3, h_prev, True)
    x_r, h_r, grad = torch.randn(B, C, H, W), torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    return [
        ("lstm_cell", (g4, c_prev, peephole), {"gates_pre"}),
        ("lstm_cell_backward", (torch.randn(B, C, H, W), torch.randn(B, C, H, W), gates, c_prev, c, peephole),
         {"gates"}),
        ("gru_cell", (x3, h3, h_prev, True), {"x_gates"}),
        ("gru_cell_backward", (torch.randn(B, C, H, W), cache, h_prev, True), {"cache"}),
        ("gru_reset_hidden", (x_r, h_r, h_prev), {"x_r"}),
        ("gru_reset_hidden_backward", (grad, x_r, h_r, h_prev), {"x_r"}),
    ]


def _sequence_cases():
    cases = []
    x = torch.randn(B, T, C_IN, H, W)
    h0, c0 = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    w_ih, w_hh = torch.randn(4 * C, C_IN, 3, 3), torch.randn(4 * C, C, 3, 3)
    bias, peephole = torch.randn(4 * C), torch.randn(3, C)
    lengths = torch.tensor([T, 2])  # variable lengths (issue 13): checked like every tensor argument
    for strategy in (0, 1):
        fwd = (x, w_ih, w_hh, bias, h0, c0, peephole, PAD, DIL, False, strategy, False, True, lengths)
        output, h_n, c_n, reserve = torch.ops.fastvid.convlstm_sequence(*fwd)
        cases.append(("convlstm_sequence", fwd, {"x", "weight_ih"}))
        cases.append(("convlstm_sequence_backward",
                      (torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), x, w_ih, w_hh, True,
                       h0, c0, peephole, output, reserve, PAD, DIL, False, strategy, False, lengths),
                      {"x", "weight_ih"}))
    w3_ih, w3_hh = torch.randn(3 * C, C_IN, 3, 3), torch.randn(3 * C, C, 3, 3)
    b_ih, b_hh = torch.randn(3 * C), torch.randn(3 * C)
    for reset_after, strategy in ((True, 1), (False, 1), (True, 0)):
        fwd = (x, w3_ih, w3_hh, b_ih, b_hh, h0, PAD, DIL, reset_after, False, strategy, False, True, lengths)
        output, h_n, reserve = torch.ops.fastvid.convgru_sequence(*fwd)
        cases.append(("convgru_sequence", fwd, {"x", "weight_ih"}))
        cases.append(("convgru_sequence_backward",
                      (torch.randn_like(output), torch.randn_like(h_n), x, w3_ih, w3_hh, b_ih, b_hh, h0, output,
                       reserve, PAD, DIL, reset_after, False, strategy, False, lengths),
                      {"x", "weight_ih"}))
    # norm="layer" (csrc/recurrent/recurrent_norm_ops.cpp)
    gains = (torch.randn(4 * C), torch.randn(4 * C), torch.randn(C), torch.randn(C))
    fwd = (x, w_ih, w_hh, bias, h0, c0, *gains, PAD, DIL, False, False, True)
    output, h_n, c_n, x_pre, h_pre, gates, cells, stats = torch.ops.fastvid.convlstm_ln_sequence(*fwd)
    cases.append(("convlstm_ln_sequence", fwd, {"x", "weight_ih"}))
    cases.append(("convlstm_ln_sequence_backward",
                  (torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), x, w_ih, w_hh, True, h0, c0,
                   *gains, output, x_pre, h_pre, gates, cells, stats, PAD, DIL, False, False), {"x", "weight_ih"}))
    gains3 = (torch.randn(3 * C), torch.randn(3 * C))
    fwd = (x, w3_ih, w3_hh, b_ih, b_hh, h0, *gains3, PAD, DIL, False, False, True)
    output, h_n, x_pre, h_pre, stats = torch.ops.fastvid.convgru_ln_sequence(*fwd)
    cases.append(("convgru_ln_sequence", fwd, {"x", "weight_ih"}))
    cases.append(("convgru_ln_sequence_backward",
                  (torch.randn_like(output), torch.randn_like(h_n), x, w3_ih, w3_hh, b_ih, b_hh, h0, *gains3, output,
                   x_pre, h_pre, stats, PAD, DIL, False, False), {"x", "weight_ih"}))
    return cases


def _depthwise_attention_cases():
    inp, weight, bias = torch.randn(B, C, 4, 5, 6), torch.randn(C, 1, 3, 3, 3), torch.randn(C)
    s, p, d = [1, 1, 1], [1, 1, 1], [1, 1, 1]
    out = torch.ops.fastvid.depthwise_conv3d(inp, weight, bias, s, p, d)
    q, k, v = torch.randn(B, 6, 4), torch.randn(B, 5, 4), torch.randn(B, 5, 3)
    o, lse, scores = torch.ops.fastvid.nonlocal_attention(q, k, v, 0.5, True)
    return [
        ("depthwise_conv3d", (inp, weight, bias, s, p, d), {"input"}),
        ("depthwise_conv3d_backward", (torch.randn_like(out), inp, weight, s, p, d, [True, True, True]), {"input"}),
        ("nonlocal_attention", (q, k, v, 0.5), {"q", "k", "v"}),
        ("nonlocal_attention_backward", (torch.randn_like(o), torch.randn_like(lse), q, k, v, o, lse, 0.5),
         {"q", "k", "v"}),
        ("nonlocal_attention_backward", (torch.randn_like(o), torch.randn_like(lse), q, k, v, o, lse, 0.5, scores),
         {"q", "k", "v"}),
    ]


def _cases():
    torch.manual_seed(0)
    return _cell_cases() + _sequence_cases() + _depthwise_attention_cases()


CASES = _cases()
ALL_OPS = {name for name in dir(torch.ops.fastvid) if not name.startswith("_")}


def _tensor_args(op_name, args):
    schema = getattr(torch.ops.fastvid, op_name).default._schema
    return [(i, a.name) for i, a in enumerate(schema.arguments[:len(args)]) if isinstance(args[i], torch.Tensor)]


def _names(message, name):
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) is not None


def _expect_rejected(op_name, args, index, name, wrong, kind, cpu_kernel=False):
    bad = list(args)
    bad[index] = wrong
    op = getattr(torch.ops.fastvid, op_name).default
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        if cpu_kernel:
            op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *bad)
        else:
            op(*bad)
    message = str(info.value)
    assert _names(message, name), f"{op_name} with a {kind} {name}: the error does not name it: {message}"


def test_every_raw_op_is_covered():
    tested = {name for name, _, _ in CASES}
    untested = {n for n in ALL_OPS if hasattr(getattr(torch.ops.fastvid, n), "default")
                and not n.startswith("triton_")} - tested
    assert not untested, f"raw ops without argument-check tests: {sorted(untested)}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_valid_arguments_run(case):
    op_name, args, _ = case
    getattr(torch.ops.fastvid, op_name)(*args)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_wrong_rank_and_dtype_named(case):
    op_name, args, _ = case
    for index, name in _tensor_args(op_name, args):
        t = args[index]
        _expect_rejected(op_name, args, index, name, torch.zeros(*t.shape, 2, dtype=t.dtype), "wrong-rank")
        _expect_rejected(op_name, args, index, name, torch.zeros(t.shape, dtype=torch.int32), "int32")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_wrong_size_named(case):
    """A leading size one too large. Arguments that define the geometry (x, the input, q/k/v...)
    are left out: a different size there is a different, valid problem."""
    op_name, args, primary = case
    for index, name in _tensor_args(op_name, args):
        if name in primary:
            continue
        t = args[index]
        shape = list(t.shape)
        shape[0] += 1
        _expect_rejected(op_name, args, index, name, torch.zeros(shape, dtype=t.dtype), "wrong-size")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_wrong_device_named(case):
    op_name, args, _ = case
    for index, name in _tensor_args(op_name, args):
        t = args[index]
        _expect_rejected(op_name, args, index, name, torch.empty(t.shape, dtype=t.dtype, device="meta"), "meta-device",
                         cpu_kernel=True)


# ------------------------------------------------------------------------------ under AddressSanitizer
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]


def _build_sanitized_extension(out_dir):
    """fastvid._C's CPU sources (as setup.py lists them) compiled with ASan/UBSan into out_dir."""
    from torch.utils.cpp_extension import include_paths, library_paths
    sources = [os.path.join(ROOT, s) for s in setup_py_namespace()["cpu_sources"](ROOT)]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cflags = ["-std=c++20", "-O1", "-g", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *SANITIZE,
              f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
              f"-I{sysconfig.get_paths()['include']}", *[f"-I{d}" for d in include_paths()]]
    objects, procs = [], []
    for src in sources:
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        objects.append(obj)
        procs.append(subprocess.Popen(["g++", *cflags, "-c", src, "-o", obj], stderr=subprocess.PIPE, text=True))
        if len(procs) == 2:  # two cores
            _wait(procs.pop(0))
    for p in procs:
        _wait(p)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    so = os.path.join(out_dir, "_C" + suffix)
    libs = [f"-L{d}" for d in library_paths()] + ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    link = subprocess.run(["g++", "-shared", *SANITIZE, "-fopenmp", *objects, "-o", so, *libs],
                          capture_output=True, text=True)
    assert link.returncode == 0, link.stderr[-4000:]
    return so


def _wait(proc):
    _, err = proc.communicate()
    assert proc.returncode == 0, f"sanitized build failed:\n{err[-4000:]}"


@pytest.mark.skipif(os.environ.get("FASTVID_ASAN_INNER") == "1", reason="this is the sanitized run itself")
def test_raw_op_checks_under_asan(tmp_path):
    """About 3 minutes on 2 idle cores (the sanitized build is most of it)."""
    # A copy of the package whose _C is the sanitized build; the tests run from it in a subprocess
    # with the ASan runtime preloaded (python itself is not instrumented).
    pkg = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "fastvid"), pkg / "fastvid", symlinks=False,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "tests"), pkg / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    so = _build_sanitized_extension(str(tmp_path))
    shutil.copy(so, pkg / "fastvid" / os.path.basename(so))
    asan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    ubsan = subprocess.run(["g++", "-print-file-name=libubsan.so"], capture_output=True, text=True).stdout.strip()
    # The sanitized _C has the CPU kernels only: CI's "CUDA kernels required" does not apply to it.
    env = {k: v for k, v in os.environ.items() if k != "FASTVID_EXPECT_CUDA_KERNELS"}
    env.update(LD_PRELOAD=f"{asan}:{ubsan}", ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1", FASTVID_ASAN_INNER="1", PYTHONPATH=str(pkg))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           "tests/test_raw_op_checks.py"], cwd=pkg, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "AddressSanitizer" not in output, output[-6000:]
    assert re.search(r"\b[1-9]\d* passed", proc.stdout), f"no test ran under the sanitizers:\n{output[-3000:]}"
    import_check = subprocess.run([sys.executable, "-c", "import fastvid._C as m; print(m.__file__)"], cwd=pkg,
                                  env=env, capture_output=True, text=True)
    assert str(pkg) in import_check.stdout, f"the sanitized _C was not the one imported: {import_check.stdout}"
