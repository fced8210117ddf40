"""Property-based tests (hypothesis): each op family against its oracle over random shapes, strides,
layouts, kernel/stride/padding/dilation and dtypes, outputs and gradients.

The example budget is fixed and the search derandomized (the same examples on every run, so CI time
is bounded: about a minute here for the whole file); a failure prints the falsifying example, and
`print_blob` prints a `@reproduce_failure` line that replays it. Tolerances: tests/_tolerances.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastvid
from fastvid.ops import depthwise_conv3d, nonlocal_attention
from _recurrent_samples import SeqConfig, assert_parity, make_seq_sample, upstream_grads
from _tolerances import assert_full_precision, assert_low_precision

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")

BUDGET = settings(max_examples=25, deadline=None, derandomize=True, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


def _check(actual, oracle, what, scale=None):
    if actual.dtype in (torch.bfloat16, torch.float16):
        assert_low_precision(actual, oracle, actual.dtype, what, scale=scale)
    else:
        assert_full_precision(actual, oracle, what, scale=scale)


# ============================================================================================ depthwise
@st.composite
def depthwise_cases(draw):
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(3))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(3))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(3))
    padding = tuple(draw(st.integers(0, 3)) for _ in range(3))
    # each input extent at least the dilated kernel reach minus the padding, so the output is not empty
    size = tuple(max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 5))
                 for k, d, p in zip(kernel, dilation, padding))
    return dict(batch=draw(st.integers(1, 2)), channels=draw(st.integers(1, 9)), multiplier=draw(st.integers(1, 3)),
                kernel=kernel, stride=stride, padding=padding, dilation=dilation, size=size,
                bias=draw(st.booleans()), dtype=draw(DTYPES),
                layout=draw(st.sampled_from(["contiguous", "channels_last_3d", "noncontiguous"])))


def _in_layout(x, layout):
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "noncontiguous":  # every other W position of a wider tensor
        wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@BUDGET
@given(depthwise_cases())
def test_depthwise_conv3d_matches_conv3d(case):
    C, m, dtype = case["channels"], case["multiplier"], case["dtype"]
    args = (case["stride"], case["padding"], case["dilation"])
    x64 = torch.randn(case["batch"], C, *case["size"], dtype=torch.float64).to(dtype).double()
    w64 = (torch.randn(C * m, 1, *case["kernel"], dtype=torch.float64) / math.prod(case["kernel"])).to(dtype).double()
    b64 = torch.randn(C * m, dtype=torch.float64).to(dtype).double() if case["bias"] else None
    x = _in_layout(x64.to(dtype), case["layout"]).requires_grad_()
    w = w64.to(dtype).requires_grad_()
    b = b64.to(dtype).requires_grad_() if b64 is not None else None
    out = depthwise_conv3d(x, w, b, *args)
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(out, leaves, grad)
    leaves64 = [t.requires_grad_() for t in (x64, w64, b64) if t is not None]
    oracle = F.conv3d(x64, w64, b64, *args, groups=C)
    oracle_grads = torch.autograd.grad(oracle, leaves64, grad.double())
    _check(out, oracle, "output")
    for name, a, e in zip(["input", "weight", "bias"], grads, oracle_grads):
        _check(a, e, f"grad {name}")


# ============================================================================================ recurrent
@st.composite
def recurrent_cases(draw):
    kind = draw(st.sampled_from(["lstm", "gru"]))
    kernel = (draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 3])))
    config = SeqConfig(kind, bias=draw(st.sampled_from(["both", "none"] + (["ih", "hh"] if kind == "gru" else []))),
                       peephole=kind == "lstm" and draw(st.booleans()),
                       reset_after=kind == "lstm" or draw(st.booleans()),
                       kernel=kernel, dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4)),
             draw(st.integers(1, 5)), draw(st.integers(1, 6)))  # B, T, C_in, C, H, W
    return dict(config=config, shape=shape, reverse=draw(st.booleans()),
                strategy=draw(st.sampled_from(["hoisted", "concat"])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "noncontiguous"])),
                seed=draw(st.integers(0, 2 ** 16)))


@BUDGET
@given(recurrent_cases())
def test_recurrent_sequence_matches_reference(case):
    sample = make_seq_sample(case["config"], case["reverse"], case["dtype"], case["layout"], case["shape"],
                             case["seed"])
    leaves = sample.leaves()
    ours = sample.run_ops(leaves, case["strategy"])
    grad_outputs = upstream_grads(ours)
    names = sample.names
    ours_grads = torch.autograd.grad(ours, [leaves[k] for k in names], grad_outputs)
    t64 = sample.converted(torch.float64)
    oracle = sample.run_reference(t64)
    oracle_grads = torch.autograd.grad(oracle, [t64[k] for k in names], [g.double() for g in grad_outputs])
    for name, a, o in zip(["output", "h_n", "c_n"], ours, oracle):
        assert_parity(a, o, case["dtype"], name)
    for name, a, o in zip(names, ours_grads, oracle_grads):
        assert_parity(a, o, case["dtype"], f"grad {name}")


# ============================================================================================ attention
@st.composite
def attention_cases(draw):
    return dict(batch=draw(st.integers(1, 2)), heads=draw(st.sampled_from([None, 1, 3])),
                queries=draw(st.integers(1, 140)), keys=draw(st.integers(1, 600)), dim=draw(st.integers(1, 40)),
                value_dim=draw(st.integers(1, 24)), scale=draw(st.floats(0.05, 2.0)), dtype=draw(DTYPES),
                layout=draw(st.sampled_from(["contiguous", "transposed", "noncontiguous"])))


def _attention_operand(shape, dtype, layout):
    t = torch.randn(shape, dtype=torch.float64).to(dtype)
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "noncontiguous":
        wide = torch.full((*shape[:-2], 2 * shape[-2], shape[-1] + 2), float("nan"), dtype=dtype)
        wide[..., ::2, 1:-1] = t
        return wide[..., ::2, 1:-1]
    return t


@BUDGET
@given(attention_cases())
def test_nonlocal_attention_matches_softmax(case):
    lead = (case["batch"],) if case["heads"] is None else (case["batch"], case["heads"])
    dtype = case["dtype"]
    q, k, v = (_attention_operand((*lead, rows, dim), dtype, case["layout"]).requires_grad_()
               for rows, dim in ((case["queries"], case["dim"]), (case["keys"], case["dim"]),
                                 (case["keys"], case["value_dim"])))
    out = nonlocal_attention(q, k, v, case["scale"])
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    oracle = torch.softmax(case["scale"] * q64 @ k64.transpose(-1, -2), dim=-1) @ v64
    oracle_grads = torch.autograd.grad(oracle, (q64, k64, v64), grad.double())
    _check(out, oracle, "output")
    # with one key (or equal scores) grad q and grad k cancel to exactly 0: their rounding noise has
    # the magnitude of the gradients that do not cancel
    scale = max(e.abs().max().item() for e in oracle_grads)
    for name, a, e in zip("qkv", grads, oracle_grads):
        _check(a, e, f"grad {name}", scale)
