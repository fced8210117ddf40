"""Triton ConvLSTM / ConvGRU cell kernels against the pure-PyTorch oracle.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` there); with one, compiled on CUDA tensors. Skipped when triton is not installed.
"""
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fastvid.triton_kernels import recurrent as tk  # noqa: E402
from fastvid.reference import recurrent as ref  # noqa: E402

if not tk.AVAILABLE:
    pytest.skip("triton unavailable", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from conftest import TRITON_DEVICE as DEVICE  # noqa: E402

# (B, C, H, W): the tiny case, and one whose B*C*H*W = 1430 spans two blocks and is not a multiple
# of BLOCK_SIZE (masked tail).
SHAPES = [(2, 3, 4, 5), (2, 5, 11, 13)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW = (torch.bfloat16, torch.float16)


def _tol(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12)
    return dict(rtol=1e-5, atol=2e-6)


def _ref_dtype(dtype):
    """The oracle runs in the test dtype, except bf16/fp16, judged against fp64 (see _close)."""
    return torch.float64 if dtype in LOW else dtype


def _rand(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _close(actual, expected, dtype, what, yardstick=None):
    """fp32/fp64: assert_close at the dtype's tolerance. bf16/fp16 (the flash-attention rule):
    ``expected`` is the fp64 oracle and ``yardstick`` the same oracle run by PyTorch in the low
    dtype (gate math upcast to fp32 there, so it cannot be garbage); the kernel's largest error
    may be at most twice the yardstick's plus one ulp of the largest magnitude."""
    assert actual.shape == expected.shape, what
    if dtype not in LOW:
        torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), **_tol(dtype),
                                   msg=lambda m: f"{what}: {m}")
        return
    exact = expected.to(torch.float64)
    err = (actual.to(torch.float64) - exact).abs().max().item()
    yard = (yardstick.to(torch.float64) - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert err <= 2 * yard + ulp, f"{what}: error {err:.3g} vs PyTorch {dtype} {yard:.3g} (+ {ulp:.3g})"


def _leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_(True)


# ---------------------------------------------------------------------------------------- LSTM
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("peephole", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_cell_matches_reference(shape, peephole, dtype):
    B, C, H, W = shape
    gen = torch.Generator().manual_seed(1)
    gates_pre = _rand(B, 4 * C, H, W, dtype=dtype, gen=gen, scale=2.0)
    c_prev = _rand(B, C, H, W, dtype=dtype, gen=gen)
    w = _rand(3, C, dtype=dtype, gen=gen, scale=0.5) if peephole else None
    grad_h = _rand(B, C, H, W, dtype=dtype, gen=gen)
    grad_c = _rand(B, C, H, W, dtype=ref.compute_dtype(dtype), gen=gen)

    ins = [_leaf(gates_pre, dtype), _leaf(c_prev, dtype)] + ([_leaf(w, dtype)] if peephole else [])
    h, c, gates = tk.lstm_cell(ins[0], ins[1], ins[2] if peephole else None)
    assert h.dtype == dtype and gates.dtype == dtype and c.dtype == ref.compute_dtype(dtype)
    grads = torch.autograd.grad((h, c), ins, (grad_h, grad_c))

    def oracle(rd):
        rins = [_leaf(t, rd) for t in ins]
        rh, rc, rgates = ref.lstm_cell(rins[0], rins[1], rins[2] if peephole else None)
        rgrads = torch.autograd.grad((rh, rc), rins, (grad_h.to(rd), grad_c.to(rc.dtype)))
        return (rh, rc, rgates, *rgrads)

    want = oracle(_ref_dtype(dtype))
    yard = oracle(dtype) if dtype in LOW else [None] * len(want)
    names = ["h", "c", "gates"] + [f"grad {n}" for n in ("gates_pre", "c_prev", "peephole")]
    for name, g, w, y in zip(names, (h, c, gates, *grads), want, yard):
        _close(g, w, dtype, name, y)
    for name, g in zip(["gates_pre", "c_prev", "peephole"], grads):
        assert g.dtype == dtype, name


@pytest.mark.parametrize("which", ["h", "c"])
def test_lstm_cell_backward_optional_grads(which):
    """grad_h / grad_c = None behaves as zeros; results match autograd through the oracle."""
    B, C, H, W = SHAPES[0]
    gen = torch.Generator().manual_seed(2)
    gates_pre = _rand(B, 4 * C, H, W, dtype=torch.float64, gen=gen)
    c_prev = _rand(B, C, H, W, dtype=torch.float64, gen=gen)
    w = _rand(3, C, dtype=torch.float64, gen=gen)
    g = _rand(B, C, H, W, dtype=torch.float64, gen=gen)
    h, c, gates = tk.lstm_cell(gates_pre, c_prev, w)
    grad_h, grad_c = (g, None) if which == "h" else (None, g)
    d_gates, d_c_prev = tk.lstm_cell_backward(grad_h, grad_c, gates, c_prev, c, w)
    z_gates, z_c_prev = tk.lstm_cell_backward(
        g if which == "h" else torch.zeros_like(g), g if which == "c" else torch.zeros_like(g),
        gates, c_prev, c, w)
    torch.testing.assert_close(d_gates, z_gates, rtol=0, atol=0)
    torch.testing.assert_close(d_c_prev, z_c_prev, rtol=0, atol=0)

    rg, rc = _leaf(gates_pre, torch.float64), _leaf(c_prev, torch.float64)
    rh, rcn, _ = ref.lstm_cell(rg, rc, w)
    rgrads = torch.autograd.grad(rh if which == "h" else rcn, (rg, rc), g)
    _close(d_gates, rgrads[0], torch.float64, "grad gates_pre")
    _close(d_c_prev, rgrads[1], torch.float64, "grad c_prev")


def test_lstm_cell_gradcheck():
    gen = torch.Generator().manual_seed(3)
    B, C, H, W = 1, 2, 2, 3
    args = (_rand(B, 4 * C, H, W, dtype=torch.float64, gen=gen).requires_grad_(),
            _rand(B, C, H, W, dtype=torch.float64, gen=gen).requires_grad_(),
            _rand(3, C, dtype=torch.float64, gen=gen).requires_grad_())
    # ``gates`` is a backward cache whose gradient is ignored by design: check (h, c) only.
    assert torch.autograd.gradcheck(lambda *a: tk.lstm_cell(*a)[:2], args)


# ---------------------------------------------------------------------------------------- GRU
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gru_cell_matches_reference(shape, reset_after, dtype):
    B, C, H, W = shape
    gen = torch.Generator().manual_seed(4)
    ins = [_leaf(_rand(B, 3 * C, H, W, dtype=dtype, gen=gen, scale=1.5), dtype),
           _leaf(_rand(B, 3 * C, H, W, dtype=dtype, gen=gen, scale=1.5), dtype),
           _leaf(_rand(B, C, H, W, dtype=dtype, gen=gen), dtype)]
    grad_h = _rand(B, C, H, W, dtype=dtype, gen=gen)

    h, cache = tk.gru_cell(*ins, reset_after)
    assert h.dtype == dtype and cache.dtype == dtype and cache.shape == (B, 4 * C, H, W)
    grads = torch.autograd.grad(h, ins, grad_h)

    def oracle(rd):
        rins = [_leaf(t, rd) for t in ins]
        rh, rcache = ref.gru_cell(*rins, reset_after)
        return (rh, rcache, *torch.autograd.grad(rh, rins, grad_h.to(rd)))

    want = oracle(_ref_dtype(dtype))
    yard = oracle(dtype) if dtype in LOW else [None] * len(want)
    names = ["h", "cache"] + [f"grad {n}" for n in ("x_gates", "h_gates", "h_prev")]
    for name, g, w, y in zip(names, (h, cache, *grads), want, yard):
        _close(g, w, dtype, name, y)
    for name, g in zip(["x_gates", "h_gates", "h_prev"], grads):
        assert g.dtype == dtype, name
    if not reset_after:  # r's gradient comes from the reset stage, not from this one
        assert grads[0][:, :C].abs().max() == 0 and grads[1][:, :C].abs().max() == 0


def test_gru_cell_backward_slots():
    """grad_x and grad_h share d r_pre / d z_pre; d h_n = r·d x_n (reset_after) or d x_n."""
    B, C, H, W = SHAPES[0]
    gen = torch.Generator().manual_seed(5)
    x, hg, hp = (_rand(B, 3 * C, H, W, dtype=torch.float64, gen=gen),
                 _rand(B, 3 * C, H, W, dtype=torch.float64, gen=gen),
                 _rand(B, C, H, W, dtype=torch.float64, gen=gen))
    g = _rand(B, C, H, W, dtype=torch.float64, gen=gen)
    for reset_after in (True, False):
        _, cache = tk.gru_cell(x, hg, hp, reset_after)
        dx, dh, dhp = tk.gru_cell_backward(g, cache, hp, reset_after)
        torch.testing.assert_close(dx[:, :2 * C], dh[:, :2 * C], rtol=0, atol=0)
        r = cache[:, :C]
        expect_hn = dx[:, 2 * C:] * r if reset_after else dx[:, 2 * C:]
        torch.testing.assert_close(dh[:, 2 * C:], expect_hn)
        torch.testing.assert_close(dhp, g * cache[:, C:2 * C])


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_cell_gradcheck(reset_after):
    gen = torch.Generator().manual_seed(6)
    B, C, H, W = 1, 2, 2, 3
    args = (_rand(B, 3 * C, H, W, dtype=torch.float64, gen=gen).requires_grad_(),
            _rand(B, 3 * C, H, W, dtype=torch.float64, gen=gen).requires_grad_(),
            _rand(B, C, H, W, dtype=torch.float64, gen=gen).requires_grad_())
    # ``cache`` is a backward cache whose gradient is ignored by design: check h only.
    assert torch.autograd.gradcheck(lambda *a: tk.gru_cell(*a, reset_after)[0], args)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gru_reset_hidden_matches_reference(shape, dtype):
    B, C, H, W = shape
    gen = torch.Generator().manual_seed(7)
    # x_r / h_r as non-contiguous channel slices of full gate tensors, as a caller would pass them.
    x_gates = _rand(B, 3 * C, H, W, dtype=dtype, gen=gen, scale=1.5)
    h_gates = _rand(B, 2 * C, H, W, dtype=dtype, gen=gen, scale=1.5)
    ins = [_leaf(x_gates, dtype), _leaf(h_gates, dtype), _leaf(_rand(B, C, H, W, dtype=dtype, gen=gen), dtype)]
    grad = _rand(B, C, H, W, dtype=dtype, gen=gen)

    out = tk.gru_reset_hidden(ins[0][:, :C], ins[1][:, :C], ins[2])
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, ins, grad)

    def oracle(rd):
        rins = [_leaf(t, rd) for t in ins]
        rout = ref.gru_reset_hidden(rins[0][:, :C], rins[1][:, :C], rins[2])
        return (rout, *torch.autograd.grad(rout, rins, grad.to(rd)))

    want = oracle(_ref_dtype(dtype))
    yard = oracle(dtype) if dtype in LOW else [None] * len(want)
    names = ["reset_h"] + [f"grad {n}" for n in ("x_gates", "h_gates", "h_prev")]
    for name, g, w, y in zip(names, (out, *grads), want, yard):
        _close(g, w, dtype, name, y)
    for name, g in zip(["x_gates", "h_gates", "h_prev"], grads):
        assert g.dtype == dtype, name


def test_gru_reset_hidden_gradcheck():
    gen = torch.Generator().manual_seed(8)
    args = tuple(_rand(1, 2, 2, 3, dtype=torch.float64, gen=gen).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(tk.gru_reset_hidden, args)


def test_ballas_gru_step_composes_with_convs():
    """reset_after=False: gru_reset_hidden + conv + gru_cell, values and all parameter grads."""
    gen = torch.Generator().manual_seed(9)
    B, Cin, C, H, W, T = 1, 2, 3, 4, 4, 2
    dt = torch.float64
    x = _rand(B, T, Cin, H, W, dtype=dt, gen=gen).requires_grad_()
    w_ih = _rand(3 * C, Cin, 3, 3, dtype=dt, gen=gen, scale=0.3).requires_grad_()
    w_hh = _rand(3 * C, C, 3, 3, dtype=dt, gen=gen, scale=0.3).requires_grad_()
    b_ih = _rand(3 * C, dtype=dt, gen=gen).requires_grad_()
    b_hh = _rand(3 * C, dtype=dt, gen=gen).requires_grad_()
    h0 = _rand(B, C, H, W, dtype=dt, gen=gen).requires_grad_()
    params = (x, w_ih, w_hh, b_ih, b_hh, h0)

    h = h0
    outs = []
    for t in range(T):
        xg = F.conv2d(x[:, t], w_ih, b_ih, padding=1)
        h_rz = F.conv2d(h, w_hh[:2 * C], b_hh[:2 * C], padding=1)
        reset_h = tk.gru_reset_hidden(xg[:, :C], h_rz[:, :C], h)
        h_n = F.conv2d(reset_h, w_hh[2 * C:], b_hh[2 * C:], padding=1)
        h, _ = tk.gru_cell(xg, torch.cat([h_rz, h_n], 1), h, False)
        outs.append(h)
    out = torch.stack(outs, 1)
    rout, _ = ref.convgru_sequence(x, w_ih, w_hh, b_ih, b_hh, h0, 1, 1, reset_after=False)
    g = _rand(*out.shape, dtype=dt, gen=gen)
    grads = torch.autograd.grad(out, params, g)
    rgrads = torch.autograd.grad(rout, params, g)
    _close(out, rout, dt, "output")
    for i, (a, b) in enumerate(zip(grads, rgrads)):
        _close(a, b, dt, f"grad param {i}")


# ---------------------------------------------------------------------------------------- misc
def test_ops_registered():
    for name in ("lstm_cell", "lstm_cell_backward", "gru_cell", "gru_cell_backward",
                 "gru_reset_hidden", "gru_reset_hidden_backward"):
        assert hasattr(torch.ops.fastvid, f"triton_{name}")


def test_small_block_many_programs(monkeypatch):
    """Many programs with a masked tail: BLOCK_SIZE 32 over 120 cells."""
    monkeypatch.setattr(tk, "BLOCK_SIZE", 32)
    gen = torch.Generator().manual_seed(10)
    B, C, H, W = SHAPES[0]
    gp = _rand(B, 4 * C, H, W, dtype=torch.float64, gen=gen)
    cp = _rand(B, C, H, W, dtype=torch.float64, gen=gen)
    for a, b in zip(tk.lstm_cell(gp, cp), ref.lstm_cell(gp, cp)):
        _close(a, b, torch.float64, "lstm")


def test_empty_batch():
    h, c, gates = tk.lstm_cell(torch.empty(0, 8, 3, 3, device=DEVICE), torch.empty(0, 2, 3, 3, device=DEVICE))
    assert h.shape == (0, 2, 3, 3) and gates.shape == (0, 8, 3, 3)


def test_double_backward_raises():
    gen = torch.Generator().manual_seed(11)
    gp = _rand(1, 8, 2, 2, dtype=torch.float64, gen=gen).requires_grad_()
    cp = _rand(1, 2, 2, 2, dtype=torch.float64, gen=gen).requires_grad_()
    h, _, _ = tk.lstm_cell(gp, cp)
    (g,) = torch.autograd.grad(h.sum(), gp, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), gp)


def test_bad_inputs():
    gen = torch.Generator().manual_seed(12)
    gp = _rand(2, 12, 4, 5, dtype=torch.float32, gen=gen)
    cp = _rand(2, 3, 4, 5, dtype=torch.float32, gen=gen)
    with pytest.raises(ValueError, match="gates_pre"):
        tk.lstm_cell(gp[:, :10], cp)  # channel mismatch
    with pytest.raises(ValueError, match="gates_pre"):
        tk.lstm_cell(gp[:1], cp)  # batch mismatch
    with pytest.raises(ValueError, match="gates_pre"):
        tk.lstm_cell(gp[..., :4], cp)  # spatial mismatch
    with pytest.raises(ValueError, match="c_prev"):
        tk.lstm_cell(gp, cp[0])  # rank 3
    with pytest.raises(ValueError, match="peephole"):
        tk.lstm_cell(gp, cp, torch.zeros(3, 4, device=DEVICE))
    with pytest.raises(TypeError, match="c_prev"):
        tk.lstm_cell(gp, cp.to(torch.int32))
    with pytest.raises(ValueError, match="gates_pre"):
        tk.lstm_cell(gp.to("meta"), cp)  # device mismatch
    hp = cp
    with pytest.raises(ValueError, match="x_gates"):
        tk.gru_cell(gp, gp[:, :9], hp, True)  # 4C instead of 3C
    with pytest.raises(ValueError, match="h_gates"):
        tk.gru_cell(gp[:, :9], gp[:, :6], hp, True)
    with pytest.raises(ValueError, match="h_r"):
        tk.gru_reset_hidden(cp, gp[:, :4], hp)
    with pytest.raises(ValueError, match="cache"):
        tk.gru_cell_backward(cp, gp[:, :9], hp, True)


def _opcheck_cases():
    gen = torch.Generator().manual_seed(13)
    B, C, H, W = 1, 2, 2, 3
    r = lambda *s: _rand(*s, dtype=torch.float64, gen=gen)  # noqa: E731
    gp, cp, w = r(B, 4 * C, H, W), r(B, C, H, W), r(3, C)
    xg, hg, hp = r(B, 3 * C, H, W), r(B, 3 * C, H, W), r(B, C, H, W)
    h, c, gates = tk.lstm_cell(gp, cp, w)
    _, cache = tk.gru_cell(xg, hg, hp, True)
    ops = torch.ops.fastvid
    return [
        (ops.triton_lstm_cell, (gp.requires_grad_(), cp.requires_grad_(), w.requires_grad_())),
        (ops.triton_lstm_cell, (gp.detach().bfloat16(), cp.detach().float(), None)),
        (ops.triton_gru_cell, (xg.requires_grad_(), hg.requires_grad_(), hp.requires_grad_(), False)),
        (ops.triton_gru_reset_hidden, (xg.detach()[:, :C], hg.detach()[:, :C], hp.detach())),
        (ops.triton_lstm_cell_backward, (h, None, gates, cp.detach(), c, w.detach())),
        (ops.triton_gru_cell_backward, (h, cache, hp.detach(), True)),
        (ops.triton_gru_reset_hidden_backward, (h, xg.detach()[:, :C], hg.detach()[:, :C], hp.detach())),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(case):
    """Schema, autograd registration, fake-tensor and AOTAutograd (dynamic shapes) checks."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_aot_eager():
    gen = torch.Generator().manual_seed(14)
    gp = _rand(2, 8, 3, 3, dtype=torch.float64, gen=gen).requires_grad_()
    cp = _rand(2, 2, 3, 3, dtype=torch.float64, gen=gen).requires_grad_()
    w = _rand(3, 2, dtype=torch.float64, gen=gen).requires_grad_()
    fn = lambda a, b, p: tk.lstm_cell(a, b, p)[0]  # noqa: E731
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(gp, cp, w)
    expected = fn(gp, cp, w)
    torch.testing.assert_close(out, expected)
    for a, b in zip(torch.autograd.grad(out.sum(), (gp, cp, w)),
                    torch.autograd.grad(expected.sum(), (gp, cp, w))):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------- launches
def test_launches_inside_device_guard(monkeypatch):
    from _triton_guard import launch_devices

    gen = torch.Generator().manual_seed(15)
    B, C, H, W = SHAPES[0]
    r = lambda *s: _rand(*s, dtype=torch.float64, gen=gen).requires_grad_()  # noqa: E731
    gates_pre = r(B, 4 * C, H, W)
    with launch_devices(monkeypatch, tk) as launches:
        h, c, _ = tk.lstm_cell(gates_pre, r(B, C, H, W), r(3, C))
        (h.sum() + c.sum()).backward()
        hg, _ = tk.gru_cell(r(B, 3 * C, H, W), r(B, 3 * C, H, W), r(B, C, H, W), True)
        hg.sum().backward()
        out = tk.gru_reset_hidden(r(B, C, H, W), r(B, C, H, W), r(B, C, H, W))
        out.sum().backward()
    assert len(launches) == 6 and launches == [gates_pre.device] * 6


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: values and gradients as on the CPU oracle."""
    gen = torch.Generator().manual_seed(16)
    B, C, H, W = SHAPES[1]
    gp = torch.randn(B, 4 * C, H, W, generator=gen, dtype=torch.float64)
    cp = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    ins = [gp.to("cuda:1").requires_grad_(), cp.to("cuda:1").requires_grad_()]
    with torch.cuda.device(0):
        h, c, _ = tk.lstm_cell(*ins)
        grads = torch.autograd.grad(h.sum() + c.sum(), ins)
    rins = [gp.requires_grad_(), cp.requires_grad_()]
    rh, rc, _ = ref.lstm_cell(*rins)
    rgrads = torch.autograd.grad(rh.sum() + rc.sum(), rins)
    for a, b in zip((h, c, *grads), (rh, rc, *rgrads)):
        assert a.device == torch.device("cuda", 1)
        torch.testing.assert_close(a.cpu(), b, **_tol(torch.float64))
