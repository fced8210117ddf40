"""Compiles the Triton kernels for real GPU targets, without a GPU: the helper behind
tests/test_triton_compile.py, run in a subprocess without TRITON_INTERPRET (under the interpreter
@triton.jit yields functions that cannot be compiled).

The launchers are run on small CPU tensors with the kernel launch replaced by a recorder, and the
launch's shared-memory limit set to the target's (``SHARED_MEMORY_LIMITS``): every recorded
launch is what the launcher would launch on that GPU (same kernel, constexprs, num_warps,
num_stages, argument types). Each distinct launch is then specialised the way ``JITFunction.run``
does (Triton's binder: argument types, 16-byte alignment, ints equal to 1) and compiled with
``triton.compile`` for ``GPUTarget("cuda", arch, 32)``, which runs the bundled ptxas.

Usage: python tests/_triton_compile.py ARCH CASE [CASE ...]; prints one JSON object per compiled
kernel: {"case", "kernel", "meta", "shared", "limit", "seconds"} or {"case", "kernel", "error"}.
CASE names are the keys of CASES.
"""
import contextlib
import json
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastvid.triton_kernels import _common  # noqa: E402
from fastvid.triton_kernels import attention as ta  # noqa: E402
from fastvid.triton_kernels import depthwise3d as td  # noqa: E402
from fastvid.triton_kernels import recurrent as tr  # noqa: E402
from fastvid.triton_kernels import recurrent_conv as trc  # noqa: E402
from fastvid.triton_kernels import recurrent_norm as tn  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def _attention(dtype, D, Dv):
    q, k, v = torch.randn(1, 20, D), torch.randn(1, 18, D), torch.randn(1, 18, Dv)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out, lse = ta.attention_forward(q, k, v, 0.5)
    ta.attention_backward(torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, 0.5)
    ta.attention_backward(torch.randn_like(out), None, q, k, v, out, lse, 0.5)


def _depthwise(dtype, kernel, multiplier=1):
    x = torch.randn(1, 2, 4, 5, 5, dtype=dtype)
    w = torch.randn(2 * multiplier, 1, *kernel, dtype=dtype)
    b = torch.randn(2 * multiplier, dtype=dtype)
    pad = tuple(k // 2 for k in kernel)
    y = td.depthwise_conv3d(x, w, b, padding=pad)
    td.depthwise_conv3d_backward(torch.randn_like(y), x, w, padding=pad)


def _recurrent(dtype):
    B, C, H, W = 1, 2, 3, 3
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    acc = tr.compute_dtype(dtype)
    for peephole in (None, r(3, C)):
        h, c, gates = tr.lstm_cell(r(B, 4 * C, H, W), r(B, C, H, W).to(acc), peephole)
        tr.lstm_cell_backward(r(B, C, H, W), c, gates, r(B, C, H, W).to(acc), c, peephole)
    tr.lstm_cell_backward(None, r(B, C, H, W).to(acc), gates, r(B, C, H, W).to(acc), c)
    tr.lstm_cell_backward(r(B, C, H, W), None, gates, r(B, C, H, W).to(acc), c)
    for reset_after in (True, False):
        h, cache = tr.gru_cell(r(B, 3 * C, H, W), r(B, 3 * C, H, W), r(B, C, H, W), reset_after)
        tr.gru_cell_backward(r(B, C, H, W), cache, r(B, C, H, W), reset_after)
    out = tr.gru_reset_hidden(r(B, C, H, W), r(B, C, H, W), r(B, C, H, W))
    tr.gru_reset_hidden_backward(out, r(B, C, H, W), r(B, C, H, W), r(B, C, H, W))
    # the masked cells of variable-length sequences (forward and backward ops)
    lengths = torch.tensor([2], dtype=torch.int64)
    for peephole in (None, r(3, C)):
        out, h, c, gates = tr.lstm_cell_masked(r(B, 4 * C, H, W), r(B, C, H, W).to(acc), r(B, C, H, W), lengths, 3,
                                               peephole)
        torch.ops.fastvid.triton_lstm_cell_masked_backward(r(B, C, H, W), r(B, C, H, W), c, gates, c, c, lengths, 3,
                                                           peephole)
    for reset_after in (True, False):
        out, h, cache = tr.gru_cell_masked(r(B, 3 * C, H, W), r(B, 3 * C, H, W), r(B, C, H, W), lengths, 3, reset_after)
        torch.ops.fastvid.triton_gru_cell_masked_backward(r(B, C, H, W), r(B, C, H, W), cache, r(B, C, H, W), lengths,
                                                          3, reset_after)


def _recurrent_conv(dtype):
    B, T, H, W = 2, 2, 3, 4
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    acc = tr.compute_dtype(dtype)
    # LSTM: peephole, training cache, lengths (every flag on), C = 40: the preferred (largest) tiles.
    C = 40
    torch.ops.fastvid.triton_convlstm_hidden(r(B, T, 4 * C, H, W), r(4 * C, C, 3, 3), r(B, C, H, W),
                                             r(B, C, H, W).to(acc), r(3, C), torch.tensor([2, 1]), [1, 1], [1, 1],
                                             False, True)
    # GRU: bias_hh, inference, C = 5: the smallest tiles.
    C = 5
    torch.ops.fastvid.triton_convgru_hidden(r(B, T, 3 * C, H, W), r(3 * C, C, 3, 3), r(3 * C), r(B, C, H, W), None,
                                            [1, 1], [1, 1], True, False, False)
    # Ballas GRU (two kernels per step): training cache, lengths.
    torch.ops.fastvid.triton_convgru_hidden(r(B, T, 3 * C, H, W), r(3 * C, C, 3, 3), r(3 * C), r(B, C, H, W),
                                            torch.tensor([2, 1]), [1, 1], [1, 1], False, False, True)


def _recurrent_norm(dtype):
    B, C, H, W = 2, 2, 3, 3
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    acc = tr.compute_dtype(dtype)
    gains = [torch.randn(n) for n in (4 * C, 4 * C, C, C)]
    for bias in (None, r(4 * C)):
        h, c, gates, stats = tn._ln_lstm_cell_impl(r(B, 4 * C, H, W), r(B, 4 * C, H, W), r(B, C, H, W).to(acc), bias,
                                                   *gains)
    for grad_h, grad_c in ((r(B, C, H, W), c), (None, c), (r(B, C, H, W), None)):
        tn._ln_lstm_cell_backward_impl(grad_h, grad_c, r(B, 4 * C, H, W), r(B, 4 * C, H, W), c, c, gates, stats,
                                       *gains)
    for bias in (None, r(3 * C)):
        h, stats = tn._ln_gru_cell_impl(r(B, 3 * C, H, W), r(B, 3 * C, H, W), r(B, C, H, W), bias, bias,
                                        torch.randn(3 * C), torch.randn(3 * C))
        tn._ln_gru_cell_backward_impl(r(B, C, H, W), r(B, 3 * C, H, W), r(B, 3 * C, H, W), r(B, C, H, W), stats, bias,
                                      bias, torch.randn(3 * C), torch.randn(3 * C))


def _cases():
    cases = {}
    for name, dtype in DTYPES.items():
        # Head dims: one tile (64, 128), chunked (320, 512: Nonlocal I3D res4), and D != Dv.
        for D, Dv in ((64, 64), (128, 128), (320, 320), (512, 512), (40, 200)):
            cases[f"attention-{name}-D{D}-Dv{Dv}"] = (_attention, dtype, D, Dv)
        for kernel in ((3, 3, 3), (1, 3, 3), (3, 1, 1), (5, 5, 5), (7, 7, 7)):
            cases[f"depthwise-{name}-k{''.join(map(str, kernel))}"] = (_depthwise, dtype, kernel)
        cases[f"depthwise-{name}-k333-m2"] = (_depthwise, dtype, (3, 3, 3), 2)
        cases[f"recurrent-{name}"] = (_recurrent, dtype)
        cases[f"recurrent_conv-{name}"] = (_recurrent_conv, dtype)
        cases[f"recurrent_norm-{name}"] = (_recurrent_norm, dtype)
    return cases


CASES = _cases()


def _specialise(fn, target, args, kwargs):
    """(signature, constexprs, attrs, options) of fn(*args, **kwargs) as JITFunction.run makes them."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization,
                                                           options)
    return signature, constexprs, attrs, options


@contextlib.contextmanager
def recording(capability, limit):
    """Launchers record their launches instead of running them, on CPU tensors, as on a GPU of
    `capability` with `limit` bytes of shared memory."""
    launches = []

    class wrap:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    saved = [(m, name, getattr(m, name)) for m in (ta, td, tr, trc, tn)
             for name in ("wrap_triton", "_launch") if hasattr(m, name)]
    saved += [(ta, "device_limits", ta.device_limits), (_common, "INTERPRET", _common.INTERPRET)]
    try:
        for m, name, _ in saved:
            if name == "wrap_triton":
                setattr(m, name, wrap)
            elif name == "_launch":
                setattr(m, name, lambda n, t: n > 0)
        ta.device_limits = lambda device: (capability, limit)
        _common.INTERPRET = True  # check_tensor: accept CPU tensors (nothing runs on them)
        yield launches
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def main(arch, case_names):
    target = GPUTarget("cuda", arch, 32)
    capability = divmod(arch, 10)
    limit = ta.SHARED_MEMORY_LIMITS[capability]
    seen = set()
    for case in case_names:
        fn, *params = CASES[case]
        with recording(capability, limit) as launches:
            fn(*params)
        for kernel, args, kwargs in launches:
            signature, constexprs, attrs, options = _specialise(kernel, target, args, kwargs)
            key = (kernel.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), options.num_warps, options.num_stages)
            if key in seen:
                continue
            seen.add(key)
            meta = {k: v for k, v in kwargs.items()}
            record = {"case": case, "kernel": kernel.__name__, "meta": meta, "limit": limit,
                      "capability": capability}
            start = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
                record.update(shared=compiled.metadata.shared, ttir=compiled.asm["ttir"])
            except Exception as error:  # reported to the test, which fails naming the kernel
                record["error"] = f"{type(error).__name__}: {error}"
            record["seconds"] = round(time.perf_counter() - start, 2)
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
