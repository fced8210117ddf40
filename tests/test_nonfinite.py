"""NaN and inf propagate through every kernel where the math says, and nowhere else: a NaN in an input
makes exactly the results that read it NaN (positions computed here from the op's receptive field),
every other result is bit-identical to a clean run (no clamping, no NaN leaking into neighbours)."""
import pytest
import torch
import torch.nn.functional as F

import fastvid
from fastvid.ops import convgru, convlstm, depthwise_conv3d, gru_cell, lstm_cell, nonlocal_attention
from fastvid.reference import recurrent as ref
from _tolerances import full_precision_tol

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")
NAN, INF = float("nan"), float("inf")


def assert_nonfinite_exactly_at(result, clean, mask, what, kind="nan"):
    """``result`` is NaN (or ±inf) exactly where ``mask`` is set and equals ``clean`` bit for bit elsewhere."""
    assert mask.any(), f"{what}: the probe reaches no result"
    hit = result.isnan() if kind == "nan" else result.isinf()
    assert torch.equal(hit, mask), (f"{what}: {kind} at {hit.sum().item()} results, expected {mask.sum().item()} "
                                    f"(missing {(mask & ~hit).sum().item()}, extra {(hit & ~mask).sum().item()})")
    assert torch.equal(result[~mask], clean[~mask]), f"{what}: results that do not read the {kind} changed"


# ============================================================================================ depthwise
DW_ARGS = ((1, 2, 1), (1, 1, 2), (1, 1, 2))  # stride, padding, dilation


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_depthwise_forward(layout, dtype, value):
    C, m = 5, 2
    x = torch.randn(2, C, 4, 7, 9).to(dtype)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(C * m, 1, 3, 3, 3).to(dtype)
    b = torch.randn(C * m).to(dtype)
    clean = depthwise_conv3d(x, w, b, *DW_ARGS)
    where = (1, 3, 2, 4, 5)
    x[where] = value
    probe = torch.zeros(x.shape, dtype=torch.float64)
    probe[where] = 1
    mask = F.conv3d(probe, torch.ones(C * m, 1, 3, 3, 3, dtype=torch.float64), None, *DW_ARGS, groups=C) > 0
    assert_nonfinite_exactly_at(depthwise_conv3d(x, w, b, *DW_ARGS), clean, mask, "output",
                                "nan" if value != INF else "inf")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_depthwise_input_gradient(layout):
    """A NaN in grad_output reaches exactly the inputs that output read."""
    C, m = 4, 2
    x = torch.randn(1, C, 4, 7, 9)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(C * m, 1, 3, 3, 3)
    out = depthwise_conv3d(x, w, None, *DW_ARGS)
    go = torch.randn(out.shape)
    mask_all = [True, False, False]
    clean = torch.ops.fastvid.depthwise_conv3d_backward(go, x, w, *DW_ARGS, mask_all)[0]
    where = (0, 5, 1, 2, 3)  # output channel 5 reads input channel 2
    go[where] = NAN
    probe = torch.zeros(out.shape, dtype=torch.float64)
    probe[where] = 1
    mask = torch.nn.grad.conv3d_input(x.shape, torch.ones(C * m, 1, 3, 3, 3, dtype=torch.float64), probe,
                                      *DW_ARGS, groups=C) > 0
    got = torch.ops.fastvid.depthwise_conv3d_backward(go, x, w, *DW_ARGS, mask_all)[0]
    assert_nonfinite_exactly_at(got, clean, mask, "grad_input")


# ============================================================================================ attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("operand", ["q", "k", "v"])
def test_attention(operand, dtype):
    """A NaN in query row i: output row i. In key row j: every output of that batch (every row's
    softmax reads it). In v[j, c]: output column c of every row (each row averages all of v)."""
    B, N, M, D, Dv = 2, 150, 530, 8, 6  # several tiles of the CPU kernel
    t = {name: torch.randn(B, rows, dim).to(dtype) for name, rows, dim in (("q", N, D), ("k", M, D), ("v", M, Dv))}
    clean = nonlocal_attention(t["q"], t["k"], t["v"], 0.4)
    mask = torch.zeros(B, N, Dv, dtype=torch.bool)
    if operand == "q":
        t["q"][1, 77, 3] = NAN
        mask[1, 77] = True
    elif operand == "k":
        t["k"][1, 300, 2] = NAN
        mask[1] = True
    else:
        t["v"][0, 515, 4] = NAN
        mask[0, :, 4] = True
    assert_nonfinite_exactly_at(nonlocal_attention(t["q"], t["k"], t["v"], 0.4), clean, mask, "output")


# ============================================================================================ recurrent
def _footprint(h0, w0, H, W, kernel, dilation):
    """The positions of a 'same'-padded conv output that read input position (h0, w0)."""
    probe = torch.zeros(1, 1, H, W, dtype=torch.float64)
    probe[0, 0, h0, w0] = 1
    pad = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    return F.conv2d(probe, torch.ones(1, 1, *kernel, dtype=torch.float64), None, 1, pad, dilation)[0, 0] > 0


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("strategy", ["hoisted", "concat"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_nan(kind, strategy, reverse):
    """A NaN in x[b, t] reaches, at step t, every channel of the positions whose gates read it, and
    nothing of the other batch elements or of the steps before it (in the direction of the scan)."""
    B, T, C_in, C, H, W = 2, 4, 3, 4, 6, 7
    kernel, dilation = (3, 3), (1, 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C_in, H, W, generator=g)
    G = 4 if kind == "lstm" else 3
    w_ih = torch.randn(G * C, C_in, *kernel, generator=g) * 0.3
    w_hh = torch.randn(G * C, C, *kernel, generator=g) * 0.3
    bias = torch.randn(G * C, generator=g)

    def run(inp):
        if kind == "lstm":
            return convlstm(inp, w_ih, w_hh, bias, dilation=dilation, reverse=reverse, strategy=strategy)[0]
        return convgru(inp, w_ih, w_hh, bias, bias, dilation=dilation, reverse=reverse, strategy=strategy)[0]

    clean = run(x)
    t0 = 2
    x[1, t0, 1, 2, 3] = NAN
    out = run(x)
    before = slice(0, t0) if not reverse else slice(t0 + 1, T)
    assert torch.equal(out[0], clean[0]), "the NaN leaked into another batch element"
    assert torch.equal(out[1, before], clean[1, before]), "the NaN leaked into earlier steps"
    mask = _footprint(2, 3, H, W, kernel, dilation).expand(C, H, W)
    assert_nonfinite_exactly_at(out[1, t0], clean[1, t0], mask, f"output at step {t0}")


@pytest.mark.parametrize("kind,strategy", [
    pytest.param(kind, strategy, id=f"{kind}-{strategy}")
    for kind in ("lstm", "gru-ballas", "gru-reset_after") for strategy in ("hoisted", "concat")])
def test_recurrent_inf_saturates_like_the_reference(kind, strategy):
    """An inf in x saturates the gates (sigmoid → 0/1, tanh → ±1): the results stay what the math gives,
    the float64 reference on the same input, not NaN and not clamped elsewhere. (The reset_after concat
    strategy used to take h_n from a convolution of [x, h] with a zero block over x: 0·inf = NaN.)"""
    B, T, C_in, C, H, W = 1, 3, 2, 3, 5, 5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, C_in, H, W, generator=g)
    x[0, 1, 0, 2, 2] = INF
    G = 4 if kind == "lstm" else 3
    w_ih = torch.randn(G * C, C_in, 3, 3, generator=g) * 0.3
    w_hh = torch.randn(G * C, C, 3, 3, generator=g) * 0.3
    zeros = torch.zeros(B, C, H, W, dtype=torch.float64)
    if kind == "lstm":
        ours = convlstm(x, w_ih, w_hh, strategy=strategy)[0]
        expected = ref.convlstm_sequence(x.double(), w_ih.double(), w_hh.double(), None, zeros, zeros, None,
                                         (1, 1), (1, 1))[0]
    else:
        reset_after = kind == "gru-reset_after"
        ours = convgru(x, w_ih, w_hh, reset_after=reset_after, strategy=strategy)[0]
        expected = ref.convgru_sequence(x.double(), w_ih.double(), w_hh.double(), None, None, zeros, (1, 1),
                                        (1, 1), reset_after)[0]
    assert torch.isfinite(expected).all()
    assert torch.isfinite(ours).all(), f"{ours.isnan().sum().item()} NaN where the math is finite"
    torch.testing.assert_close(ours.double(), expected, **full_precision_tol(torch.float32))


@pytest.mark.parametrize("gate", range(4), ids=list("ifgo"))
def test_lstm_cell_nan_per_gate(gate):
    """gates_pre channel gate·C + c feeds h[c] and, unless it is the output gate, c[c]: at that position only."""
    B, C, H, W = 2, 3, 4, 5
    gates = torch.randn(B, 4 * C, H, W)
    c_prev = torch.randn(B, C, H, W)
    peephole = torch.randn(3, C)
    h_clean, c_clean = lstm_cell(gates, c_prev, peephole)
    gates[1, gate * C + 2, 3, 1] = NAN
    h, c = lstm_cell(gates, c_prev, peephole)
    mask = torch.zeros(B, C, H, W, dtype=torch.bool)
    mask[1, 2, 3, 1] = True
    assert_nonfinite_exactly_at(h, h_clean, mask, "h")
    if gate == 3:
        assert torch.equal(c, c_clean), "the output gate does not feed the cell state"
    else:
        assert_nonfinite_exactly_at(c, c_clean, mask, "c")


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "ballas"])
@pytest.mark.parametrize("operand", ["x_gates", "h_gates"])
def test_gru_cell_nan(operand, reset_after):
    B, C, H, W = 2, 3, 4, 5
    t = {"x_gates": torch.randn(B, 3 * C, H, W), "h_gates": torch.randn(B, 3 * C, H, W)}
    h_prev = torch.randn(B, C, H, W)
    clean = gru_cell(t["x_gates"], t["h_gates"], h_prev, reset_after)
    mask = torch.zeros(B, C, H, W, dtype=torch.bool)
    mask[0, 1, 2, 4] = True
    for gate in range(3):
        probe = {k: v.clone() for k, v in t.items()}
        probe[operand][0, gate * C + 1, 2, 4] = NAN
        got = gru_cell(probe["x_gates"], probe["h_gates"], h_prev, reset_after)
        if gate == 0 and not reset_after:
            # Ballas: r acts before the cell (h_gates' n block is U·(r·h), from gru_reset_hidden)
            assert torch.equal(got, clean), "the cell does not read r without reset_after"
        else:
            assert_nonfinite_exactly_at(got, clean, mask, f"h ({operand} gate {gate})")
