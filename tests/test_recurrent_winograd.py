"""The 'winograd' sequence strategy (csrc/recurrent/recurrent_winograd_cpu.cpp): values and gradients
against the fp64 oracle (fastvid.reference), with the error bound of issue 12: no more than 4x the
error of the oneDNN ('hoisted') path on the same inputs, measured here, plus a small atol; under
every CPU ISA path; gradcheck in fp64; opcheck of the sequence ops with strategy 2; bad input."""
import pytest
import torch

import fastvid
from fastvid.ops import recurrent as ops_recurrent
from fastvid.reference import recurrent as ref
from _isa import cpu_isa  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="needs fastvid._C")

ERROR_RATIO = 4.0  # issue 12: winograd error <= 4x the oneDNN path's error against fp64


def channels_last_frames(x):
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def make_inputs(op, B, T, C_in, C, H, W, layout, bias=True, peephole=False, seed=0):
    """float64 master values (scaled so the gates are not saturated) and the requires-grad leaves."""
    g = torch.Generator().manual_seed(seed)
    G = 4 if op == "lstm" else 3
    scale_ih, scale_hh = 1.0 / (3 * C_in ** 0.5), 1.0 / (3 * C ** 0.5)
    t = dict(x=torch.randn(B, T, C_in, H, W, generator=g, dtype=torch.float64),
             weight_ih=torch.randn(G * C, C_in, 3, 3, generator=g, dtype=torch.float64) * scale_ih,
             weight_hh=torch.randn(G * C, C, 3, 3, generator=g, dtype=torch.float64) * scale_hh,
             h0=torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 0.5)
    if op == "lstm":
        t["c0"] = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 0.5
        if bias:
            t["bias"] = torch.randn(4 * C, generator=g, dtype=torch.float64) * 0.1
        if peephole:
            t["peephole"] = torch.randn(3, C, generator=g, dtype=torch.float64) * 0.1
    elif bias:
        t["bias_ih"] = torch.randn(3 * C, generator=g, dtype=torch.float64) * 0.1
        t["bias_hh"] = torch.randn(3 * C, generator=g, dtype=torch.float64) * 0.1
    if layout == "channels_last":
        t["x"] = channels_last_frames(t["x"])
        for k in ("h0", "c0"):
            if k in t:
                t[k] = t[k].contiguous(memory_format=torch.channels_last)
    return t


def leaves(master, dtype):
    out = {}
    for k, v in master.items():
        # .to() keeps the memory format; the fp64 oracle sees exactly the rounded values
        out[k] = v.to(dtype).detach().requires_grad_(True)
    return out


def run(op, t, strategy, reverse=False, reset_after=True):
    """Outputs (sequence, final states) and the gradients of a fixed random upstream gradient."""
    if strategy == "reference":
        if op == "lstm":
            out = ref.convlstm_sequence(t["x"], t["weight_ih"], t["weight_hh"], t.get("bias"), t["h0"], t["c0"],
                                        t.get("peephole"), (1, 1), (1, 1), reverse)
        else:
            out = ref.convgru_sequence(t["x"], t["weight_ih"], t["weight_hh"], t.get("bias_ih"), t.get("bias_hh"),
                                       t["h0"], (1, 1), (1, 1), reset_after, reverse)
    elif op == "lstm":
        out = fastvid.ops.convlstm(t["x"], t["weight_ih"], t["weight_hh"], t.get("bias"), t["h0"], t["c0"],
                                   t.get("peephole"), reverse=reverse, strategy=strategy)
    else:
        out = fastvid.ops.convgru(t["x"], t["weight_ih"], t["weight_hh"], t.get("bias_ih"), t.get("bias_hh"),
                                  t["h0"], reset_after=reset_after, reverse=reverse, strategy=strategy)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in out]
    names = list(t)
    grads = torch.autograd.grad(out, [t[k] for k in names], upstream)
    return [o.detach() for o in out] + list(grads), ["output"] + [f"state{i}" for i in range(len(out) - 1)] + \
        [f"grad_{k}" for k in names]


def errors(results, oracle):
    return [(r.double() - o).abs().max().item() for r, o in zip(results, oracle)]


def check_against_oracle(op, master, dtype=torch.float32, **kw):
    oracle, names = run(op, leaves(master, torch.float64), "reference", **kw)
    wino, _ = run(op, leaves(master, dtype), "winograd", **kw)
    onednn, _ = run(op, leaves(master, dtype), "hoisted", **kw)
    assert_within_bound(names, wino, onednn, oracle, dtype)


def assert_within_bound(names, wino, onednn, oracle, dtype):
    eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps  # bf16 products accumulate in fp32
    for name, e_w, e_d, o in zip(names, errors(wino, oracle), errors(onednn, oracle), oracle):
        atol = 8 * eps * max(1.0, o.abs().max().item())  # a few ulps: sums of near-zero terms
        assert e_w <= ERROR_RATIO * e_d + atol, (
            f"{name}: winograd error {e_w:.3g} > {ERROR_RATIO} x oneDNN error {e_d:.3g} + {atol:.3g}")


SHAPES = {  # (B, T, C_in, C, H, W)
    "base": (2, 3, 5, 6, 8, 8),
    "odd": (2, 2, 3, 5, 7, 9),      # H, W not divisible by 4
    "tiny": (1, 2, 3, 4, 3, 2),     # H, W < 4
    "T1": (2, 1, 4, 4, 6, 5),
    "T33": (1, 33, 3, 4, 6, 5),     # backward chunks of 2 steps (the last of 1) summed in the Winograd domain
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_lstm_values_and_gradients(cpu_isa, shape, layout):
    check_against_oracle("lstm", make_inputs("lstm", *SHAPES[shape], layout))


@pytest.mark.parametrize("bias,peephole", [(False, False), (True, True)])
@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_options(cpu_isa, bias, peephole, reverse):
    check_against_oracle("lstm", make_inputs("lstm", *SHAPES["odd"], "contiguous", bias, peephole), reverse=reverse)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_values_and_gradients(cpu_isa, shape, layout, reset_after):
    check_against_oracle("gru", make_inputs("gru", *SHAPES[shape], layout), reset_after=reset_after)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gru_options(cpu_isa, reverse, bias):
    check_against_oracle("gru", make_inputs("gru", *SHAPES["odd"], "contiguous", bias), reverse=reverse)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op,reset_after", [("lstm", True), ("gru", True), ("gru", False)])
def test_bf16_values_and_gradients(cpu_isa, shape, layout, op, reset_after):
    """bf16 runs F(4x4, 3x3) with fp32 products (recurrent_winograd.h, winograd_tile): held to the same
    bound against the oneDNN bf16 path, on every shape (H, W not divisible by 4, smaller than a tile)."""
    kw = {} if op == "lstm" else dict(reset_after=reset_after)
    check_against_oracle(op, make_inputs(op, *SHAPES[shape], layout), dtype=torch.bfloat16, **kw)


@pytest.mark.parametrize("op,reset_after", [("lstm", True), ("gru", True), ("gru", False)])
def test_bf16_benchmark_sized_accuracy(op, reset_after):
    kw = {} if op == "lstm" else dict(reset_after=reset_after)
    check_against_oracle(op, make_inputs(op, 1, 3, 32, 32, 32, 32, "channels_last"), dtype=torch.bfloat16, **kw)


@pytest.mark.parametrize("op,reset_after", [("lstm", True), ("gru", True), ("gru", False)])
def test_benchmark_sized_accuracy(op, reset_after):
    """The bound at a benchmark-like size (C = 32, 32x32, where the sums are long). F(4x4, 3x3) failed
    the bound on these tests (3-11x per tensor), which is why the kernel runs F(2x2, 3x3)."""
    kw = {} if op == "lstm" else dict(reset_after=reset_after)
    check_against_oracle(op, make_inputs(op, 1, 2, 32, 32, 32, 32, "contiguous"), **kw)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gru_gates_span_column_blocks(cpu_isa, layout):
    """nn.GRU form with C = 40 and C_in = 24: each gate's 40 columns are padded to 64 in the fused
    step (two GEMM column blocks, the second part-used), between the summed r, z columns and the
    separate x_n, h_n ones; in the backward W_hh's gradient reads the gate-gradient frame's columns
    [40, 160), which start inside a GEMM column block (the kernel computes from column 32 on)."""
    check_against_oracle("gru", make_inputs("gru", 2, 2, 24, 40, 6, 10, layout), reset_after=True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op,reset_after", [("lstm", True), ("gru", True), ("gru", False)])
def test_large_weights_in_column_panels(cpu_isa, layout, op, reset_after):
    """C_in = 96, C = 136: every convolution's transformed weights V (forward and backward) exceed half
    of any L2 (2.9-9.5 MB per call), so its GEMMs read V from column panels copied once per call
    (packs_v); C not a multiple of the 32-column block puts the gates' padded columns, and the GRU's
    separate x_n / h_n column segments, inside and across panels."""
    kw = {} if op == "lstm" else dict(reset_after=reset_after)
    check_against_oracle(op, make_inputs(op, 1, 2, 96, 136, 5, 6, layout), **kw)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
def test_gru_merged_input_gradients(cpu_isa, layout, dtype, reverse):
    """The nn.GRU-form backward runs a step's grad_x and dh convolutions as one over the gate-gradient
    frame [x_n, r, z, h_n] (winograd_gru_input_grads) and reorders W_ih's and b_ih's gradients from it.
    C_in = 32 fills grad_x's column block exactly (dh's segment follows with no gap; the other shapes of
    this file leave a gap); C = 5 leaves dh's column block part-used."""
    check_against_oracle("gru", make_inputs("gru", 2, 3, 32, 5, 5, 7, layout), dtype=dtype, reset_after=True,
                         reverse=reverse)


def test_gru_merged_input_gradients_gradcheck_fp64():
    master = make_inputs("gru", 1, 2, 32, 2, 3, 4, "contiguous")
    names = list(master)
    t = leaves(master, torch.float64)

    def fn(*args):
        d = dict(zip(names, args))
        return fastvid.ops.convgru(d["x"], d["weight_ih"], d["weight_hh"], d["bias_ih"], d["bias_hh"], d["h0"],
                                   strategy="winograd")

    assert torch.autograd.gradcheck(fn, [t[k] for k in names], eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("reset_after", [True, False])
def test_benchmark_sized_accuracy_gru(reset_after):
    """The same for ConvGRU: its weight gradients sum the Winograd-domain products over B·T·H·W/4 tiles."""
    check_against_oracle("gru", make_inputs("gru", 2, 3, 32, 32, 32, 32, "channels_last"), reset_after=reset_after)


@pytest.mark.parametrize("op", ["lstm", "gru"])
def test_weight_grad_deterministic_at_one_two_three_threads(op):
    """The Winograd weight gradient sums fixed chunks of tile groups (one per thread) into their own partial
    sums, kept for the whole backward and added in chunk order at its end: at 1, 2 and 3 threads (3 > this
    machine's cores, so chunks share threads) two runs are bit-identical and each is within the bound
    against fp64."""
    master = make_inputs(op, 3, 2, 8, 8, 16, 16, "contiguous")  # 3 tile groups (of 8 strips) per weight-gradient call
    oracle, names = run(op, leaves(master, torch.float64), "reference")
    onednn, _ = run(op, leaves(master, torch.float32), "hoisted")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            first, _ = run(op, leaves(master, torch.float32), "winograd")
            again, _ = run(op, leaves(master, torch.float32), "winograd")
            for name, a, b in zip(names, first, again):
                assert torch.equal(a, b), f"{name}: two runs at {n} threads differ"
            assert_within_bound(names, first, onednn, oracle, torch.float32)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("op", ["lstm", "gru"])
def test_gradcheck_fp64(op):
    master = make_inputs(op, 1, 2, 2, 3, 5, 6, "contiguous", peephole=True)
    names = list(master)
    t = leaves(master, torch.float64)

    def fn(*args):
        d = dict(zip(names, args))
        if op == "lstm":
            return fastvid.ops.convlstm(d["x"], d["weight_ih"], d["weight_hh"], d.get("bias"), d["h0"], d["c0"],
                                        d.get("peephole"), strategy="winograd")
        return fastvid.ops.convgru(d["x"], d["weight_ih"], d["weight_hh"], d.get("bias_ih"), d.get("bias_hh"),
                                   d["h0"], strategy="winograd")

    assert torch.autograd.gradcheck(fn, [t[k] for k in names], eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("save", [False, True])
def test_opcheck(save):
    t = make_inputs("lstm", 2, 2, 3, 4, 5, 6, "contiguous", peephole=True)
    args = (t["x"], t["weight_ih"], t["weight_hh"], t["bias"], t["h0"], t["c0"], t["peephole"], [1, 1], [1, 1], False,
            2, False, save)
    torch.library.opcheck(torch.ops.fastvid.convlstm_sequence, args)
    g = make_inputs("gru", 2, 2, 3, 4, 5, 6, "channels_last")
    gargs = (g["x"], g["weight_ih"], g["weight_hh"], g["bias_ih"], g["bias_hh"], g["h0"], [1, 1], [1, 1], True,
             False, 2, True, save)
    torch.library.opcheck(torch.ops.fastvid.convgru_sequence, gargs)


def test_opcheck_backward():
    t = make_inputs("lstm", 1, 2, 3, 4, 5, 6, "contiguous")
    x, w_ih, w_hh, b, h0, c0 = (t[k] for k in ("x", "weight_ih", "weight_hh", "bias", "h0", "c0"))
    out, h_n, c_n, reserve = torch.ops.fastvid.convlstm_sequence(
        x, w_ih, w_hh, b, h0, c0, None, [1, 1], [1, 1], False, 2, False, True)
    args = (torch.randn_like(out), None, None, x, w_ih, w_hh, True, h0, c0, None, out, reserve,
            [1, 1], [1, 1], False, 2, False)
    torch.library.opcheck(torch.ops.fastvid.convlstm_sequence_backward, args)


def test_bad_input_kernel_and_dilation():
    x = torch.randn(1, 2, 3, 8, 8)
    w_ih5, w_hh5 = torch.randn(16, 3, 5, 5), torch.randn(16, 4, 5, 5)
    with pytest.raises(ValueError, match="winograd.*3x3"):
        fastvid.ops.convlstm(x, w_ih5, w_hh5, strategy="winograd")
    w_ih, w_hh = torch.randn(16, 3, 3, 3), torch.randn(16, 4, 3, 3)
    with pytest.raises(ValueError, match="winograd.*dilation"):
        fastvid.ops.convlstm(x, w_ih, w_hh, dilation=2, strategy="winograd")
    # the C++ ops name the reason too (strategy 2 called directly)
    h0 = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="strategy 2 \\(winograd\\).*3x3"):
        torch.ops.fastvid.convlstm_sequence(x, w_ih5, w_hh5, None, h0, h0, None, [2, 2], [1, 1], False, 2, False,
                                            False)
    with pytest.raises(ValueError, match="strategy 2 \\(winograd\\).*dilation"):
        torch.ops.fastvid.convgru_sequence(x, torch.randn(12, 3, 3, 3), torch.randn(12, 4, 3, 3), None, None, h0,
                                           [2, 2], [2, 2], True, False, 2, False, False)


def test_auto_times_winograd_only_where_eligible():
    ops_recurrent.set_strategy("auto")
    try:
        x = torch.randn(1, 2, 3, 8, 8)
        fastvid.ops.convlstm(x, torch.randn(16, 3, 5, 5), torch.randn(16, 4, 5, 5))  # 5x5: winograd not timed
        fastvid.ops.convlstm(x, torch.randn(16, 3, 3, 3), torch.randn(16, 4, 3, 3))
        chosen = ops_recurrent.chosen_strategies()
        by_kernel = {key[7]: name for key, name in chosen.items()}
        assert by_kernel[(5, 5)] in ("hoisted", "concat")
        assert by_kernel[(3, 3)] in ops_recurrent.STRATEGIES
    finally:
        ops_recurrent.set_strategy("auto")


def test_deterministic_mode_keeps_hoisted():
    ops_recurrent.set_strategy("auto")
    torch.use_deterministic_algorithms(True)
    try:
        x = torch.randn(1, 2, 3, 8, 8)
        fastvid.ops.convlstm(x, torch.randn(16, 3, 3, 3), torch.randn(16, 4, 3, 3))
        assert ops_recurrent.chosen_strategies() == {}  # fixed choice: nothing timed
    finally:
        torch.use_deterministic_algorithms(False)
