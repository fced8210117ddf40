"""Triton depthwise 3D convolution kernels against F.conv3d(groups=C).

Without a GPU the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` there); with one, compiled on CUDA tensors. Skipped when triton is not installed.
Shapes are tiny: the interpreter is slow.
"""
import functools
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fastvid.triton_kernels import depthwise3d as tk  # noqa: E402

if not tk.AVAILABLE:
    pytest.skip("triton unavailable", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from conftest import TRITON_DEVICE as DEVICE  # noqa: E402

# (B, C, m, (T, H, W), kernel, stride, padding, dilation, bias)
CONFIGS = [
    (2, 3, 1, (5, 6, 4), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), True),
    (1, 4, 2, (6, 5, 6), (2, 3, 1), (2, 1, 3), (1, 0, 2), (2, 1, 1), False),
    (1, 3, 3, (6, 6, 5), (3, 2, 3), (1, 2, 2), (2, 1, 0), (1, 2, 2), True),
]
IDS = ["k3-pad1", "mult2-stride-dil", "mult3-mixed"]


def _tol(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12)
    return dict(rtol=1e-5, atol=1e-5)


def _sample(config, dtype, seed=0):
    B, C, m, (T, H, W), k, s, p, d, bias = config
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, H, W, dtype=dtype, generator=gen).to(DEVICE)
    w = torch.randn(C * m, 1, *k, dtype=dtype, generator=gen).to(DEVICE)
    b = torch.randn(C * m, dtype=dtype, generator=gen).to(DEVICE) if bias else None
    return x, w, b, s, p, d


def _check(x, w, b, s, p, d, dtype):
    ins = [t.detach().clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    rins = [t.detach().clone().requires_grad_(True) for t in ins]
    bias, rbias = (ins[2], rins[2]) if b is not None else (None, None)
    y = tk.depthwise_conv3d(ins[0], ins[1], bias, s, p, d)
    yr = F.conv3d(rins[0], rins[1], rbias, s, p, d, groups=x.shape[1])
    assert y.shape == yr.shape and y.dtype == dtype
    torch.testing.assert_close(y, yr, **_tol(dtype))
    go = torch.randn(yr.shape, dtype=dtype, generator=torch.Generator().manual_seed(7)).to(x.device)
    grads = torch.autograd.grad(y, ins, go)
    rgrads = torch.autograd.grad(yr, rins, go)
    for name, g, r in zip(("input", "weight", "bias"), grads, rgrads):
        torch.testing.assert_close(g, r, **_tol(dtype), msg=lambda m: f"grad_{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_matches_conv3d(config, dtype):
    _check(*_sample(config, dtype), dtype)


def test_many_programs_and_noncontiguous(monkeypatch):
    # Small blocks: many programs, masked tails, several weight-gradient splits; a channels_last_3d
    # input and a non-contiguous weight go through the wrapper's .contiguous().
    monkeypatch.setattr(tk, "BLOCK_SIZE", 16)
    monkeypatch.setattr(tk, "MAX_SPLITS", 3)
    x, w, b, s, p, d = _sample(CONFIGS[0], torch.float64, seed=3)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    w = w.transpose(2, 4).contiguous().transpose(2, 4)
    assert not w.is_contiguous()
    _check(x, w, b, s, p, d, torch.float64)


def test_partial_gradients_and_backward_op():
    x, w, b, s, p, d = _sample(CONFIGS[1], torch.float32)
    y = F.conv3d(x, w, None, s, p, d, groups=x.shape[1])
    go = torch.randn(y.shape, device=DEVICE)
    gi, gw, gb = tk.depthwise_conv3d_backward(go, x, w, s, p, d, (False, True, True))
    assert gi.numel() == 0
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    br = torch.zeros(w.shape[0], device=DEVICE, requires_grad=True)
    rgw, rgb = torch.autograd.grad(F.conv3d(xr, wr, br, s, p, d, groups=x.shape[1]), (wr, br), go)
    torch.testing.assert_close(gw, rgw, **_tol(torch.float32))
    torch.testing.assert_close(gb, rgb, **_tol(torch.float32))
    # Only the input needs a gradient.
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(tk.depthwise_conv3d(xg, w, None, s, p, d), (xg,), go)
    (rgx,) = torch.autograd.grad(F.conv3d(xr, w, None, s, p, d, groups=x.shape[1]), (xr,), go)
    torch.testing.assert_close(gx, rgx, **_tol(torch.float32))


def test_meta_shapes():
    x = torch.empty(2, 3, 5, 6, 4, device="meta")
    w = torch.empty(6, 1, 3, 3, 3, device="meta")
    y = torch.ops.fastvid.triton_depthwise_conv3d(x, w, None, [1, 2, 1], [1, 1, 1], [1, 1, 2])
    assert y.shape == F.conv3d(torch.empty(2, 3, 5, 6, 4), torch.empty(6, 1, 3, 3, 3), None,
                               (1, 2, 1), (1, 1, 1), (1, 1, 2), groups=3).shape


def test_bad_inputs():
    randn = functools.partial(torch.randn, device=DEVICE)
    x = randn(1, 3, 4, 4, 4)
    with pytest.raises(ValueError, match="weight must be"):
        tk.depthwise_conv3d(x, randn(4, 1, 3, 3, 3))  # 4 is not a multiple of C = 3
    with pytest.raises(ValueError, match="kernel sizes"):
        tk.depthwise_conv3d(x, randn(3, 1, 8, 1, 1), padding=(4, 0, 0))
    with pytest.raises(ValueError, match="5-D"):
        tk.depthwise_conv3d(x[0], randn(3, 1, 3, 3, 3))
    with pytest.raises(TypeError, match="dtype"):
        tk.depthwise_conv3d(x, randn(3, 1, 3, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="too small"):
        tk.depthwise_conv3d(x, randn(3, 1, 5, 3, 3))
    with pytest.raises(ValueError, match="stride"):
        tk.depthwise_conv3d(x, randn(3, 1, 3, 3, 3), stride=(0, 1, 1))
    with pytest.raises(ValueError, match="bias"):
        tk.depthwise_conv3d(x, randn(3, 1, 3, 3, 3), randn(4))


def test_public_op_triton_backend():
    import fastvid
    from fastvid.ops.depthwise3d import depthwise_conv3d

    x, w, b, s, p, d = _sample(CONFIGS[2], torch.float32, seed=5)
    with fastvid.backend("triton"):
        y = depthwise_conv3d(x, w, b, s, p, d)
    torch.testing.assert_close(y, F.conv3d(x, w, b, s, p, d, groups=x.shape[1]), **_tol(torch.float32))


# ------------------------------------------------------------------------------ bf16 / fp16
def _abs_sums(x, w, b, go, s, p, d):
    """Per output element of the forward, input gradient and weight/bias gradient: Σ|term| over
    the products it sums (fp64), from the same convolution on absolute values."""
    xa, wa = x.double().abs().requires_grad_(True), w.double().abs().requires_grad_(True)
    ba = b.double().abs().requires_grad_(True) if b is not None else None
    y = F.conv3d(xa, wa, ba, s, p, d, groups=x.shape[1])
    grads = torch.autograd.grad(y, [t for t in (xa, wa, ba) if t is not None], go.double().abs())
    return (y.detach(), *grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_low_precision_matches_fp64_oracle(config, dtype):
    """bf16/fp16 in, fp32 accumulation, one rounding to the dtype on the way out. Judged against
    the fp64 convolution of the same (rounded) inputs, per element:
        |ours - exact| <= eps(dtype)·|exact| + n·eps(fp32)·Σ|terms|
    (one output rounding, with a factor-2 margin, plus fp32 summation of n terms), for values and
    the input, weight and bias gradients. The interpreter takes the FIX_BF16 store path here (bf16
    rounded by hand); the compiled GPU variant is covered by tests/test_triton_compile.py."""
    x, w, b, s, p, d = _sample(config, torch.float64, seed=19)
    x, w = x.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    ins = [t.detach().clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    y = tk.depthwise_conv3d(ins[0], ins[1], ins[2] if b is not None else None, s, p, d)
    go = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, ins, go)

    rins = [t.detach().double().requires_grad_(True) for t in ins]
    yr = F.conv3d(rins[0], rins[1], rins[2] if b is not None else None, s, p, d, groups=x.shape[1])
    rgrads = torch.autograd.grad(yr, rins, go.double())
    sums = _abs_sums(x, w, b, go, s, p, d)

    B, C, m, _, k, *_ = config
    taps = k[0] * k[1] * k[2]
    positions = B * yr.shape[2] * yr.shape[3] * yr.shape[4]
    terms = (taps + 1, m * taps, positions, positions)  # y, grad input, grad weight, grad bias
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    for name, got, exact, total, n in zip(("output", "grad_input", "grad_weight", "grad_bias"),
                                          (y, *grads), (yr, *rgrads), sums, terms):
        assert got.dtype == dtype, name
        err = (got.double() - exact).abs()
        bound = eps * exact.abs() + n * eps32 * total
        worst = (err - bound).argmax()
        assert (err <= bound).all(), (f"{name}: error {err.flatten()[worst]:.3g} > bound "
                                      f"{bound.flatten()[worst]:.3g} at flat index {worst}")


def test_launches_inside_device_guard(monkeypatch):
    from _triton_guard import launch_devices

    x, w, b, s, p, d = _sample(CONFIGS[0], torch.float64, seed=20)
    with launch_devices(monkeypatch, tk) as launches:
        _check(x, w, b, s, p, d, torch.float64)
    assert len(launches) == 3 and launches == [x.device] * 3  # forward, input grad, weight grad


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current."""
    x, w, b, s, p, d = (t.to("cuda:1") if isinstance(t, torch.Tensor) else t
                        for t in _sample(CONFIGS[1], torch.float32, seed=21))
    with torch.cuda.device(0):
        _check(x, w, b, s, p, d, torch.float32)
