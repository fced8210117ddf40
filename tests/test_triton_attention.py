"""Triton nonlocal (flash-style) attention kernels against a float64 softmax oracle.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` there); with one, compiled on CUDA tensors. Skipped when triton is not installed.
Shapes are tiny: the interpreter is slow.
Most tests shrink the tiles to 16 so a few dozen rows already span several query and key blocks
with masked tails.
"""
import math
import os

import pytest
import torch

pytest.importorskip("triton")

from fastvid.triton_kernels import attention as ta  # noqa: E402

if not ta.AVAILABLE:
    pytest.skip("triton unavailable", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from conftest import TRITON_DEVICE as DEVICE  # noqa: E402

# (B, N, M, D, Dv): queries N and keys M off the tile multiples, one key, a single query,
# D != Dv, D not a power of two, the widest head dim.
CASES = [
    (2, 37, 21, 16, 16),
    (1, 20, 1, 8, 12),
    (2, 33, 50, 24, 5),
    (1, 1, 40, 3, 7),
    (1, 9, 18, 256, 200),
]
IDS = ["tails", "one-key", "odd-dims", "one-query", "d256"]


@pytest.fixture
def small_tiles(monkeypatch):
    for name in ("BLOCK_N", "BLOCK_M", "BWD_BLOCK_N", "BWD_BLOCK_M"):
        monkeypatch.setattr(ta, name, 16)


@pytest.fixture
def narrow_chunks(monkeypatch):
    """Head-dim chunks of 16: head dims past 16 take the chunked (D_FITS / DV_FITS false) paths."""
    monkeypatch.setattr(ta, "MAX_BLOCK_D", 16)


def _sample(case, dtype, seed=0):
    B, N, M, D, Dv = case
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    q, k, v = r(B, N, D), r(B, M, D), r(B, M, Dv)
    grad_out, grad_lse = r(B, N, Dv), r(B, N)
    scale = 1.7 / math.sqrt(D)  # a bit sharper than 1/sqrt(D): peaked, not uniform, rows
    return [t.to(dtype).to(DEVICE) for t in (q, k, v, grad_out, grad_lse)], scale


def _oracle(q, k, v, scale):
    """out, lse = softmax(scale q kᵀ) v, logsumexp(scale q kᵀ), written out plainly."""
    scores = scale * q @ k.transpose(1, 2)
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def _values_and_grads(fn, q, k, v, scale, grad_out, grad_lse, dtype=None):
    """(out, lse, dq, dk, dv) of fn with inputs cast to dtype; loss <out, grad_out> + <lse, grad_lse>."""
    dtype = dtype or q.dtype
    ins = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*ins, scale)
    terms = [(out * grad_out.to(out.dtype)).sum()]
    if grad_lse is not None:
        terms.append((lse * grad_lse.to(lse.dtype)).sum())
    grads = torch.autograd.grad(sum(terms), ins)
    return (out, lse, *grads)


NAMES = ("out", "lse", "dq", "dk", "dv")


def _tol(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-11)
    return dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_oracle(case, dtype, small_tiles):
    (q, k, v, grad_out, grad_lse), scale = _sample(case, dtype)
    got = _values_and_grads(ta.attention_forward, q, k, v, scale, grad_out, grad_lse)
    want = _values_and_grads(_oracle, q, k, v, scale, grad_out, grad_lse, torch.float64)
    assert got[0].dtype == dtype and got[0].is_contiguous()
    assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, **_tol(dtype), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[IDS[0], IDS[2]])
def test_low_precision_flash_style(case, dtype, small_tiles):
    """Half-precision error at most twice the error of the same oracle run in that dtype (plus a
    small atol): low-precision operands, fp32 accumulation."""
    (q, k, v, grad_out, grad_lse), scale = _sample(case, dtype, seed=1)
    got = _values_and_grads(ta.attention_forward, q, k, v, scale, grad_out, grad_lse)
    exact = _values_and_grads(_oracle, q, k, v, scale, grad_out, grad_lse, torch.float64)
    naive = _values_and_grads(_oracle, q, k, v, scale, grad_out, grad_lse, dtype)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, g, e, n in zip(NAMES, got, exact, naive):
        err = (g.double() - e).abs().max().item()
        naive_err = (n.double() - e).abs().max().item()
        assert err <= 2 * naive_err + 1e-3, f"{name}: error {err:.3g} vs {dtype} oracle {naive_err:.3g}"
    # lse is kept in fp32 from exact products of the rounded inputs: fp32-accurate.
    torch.testing.assert_close(got[1].double(), exact[1], rtol=1e-5, atol=1e-5)


def test_default_tiles():
    """Module tile sizes (64), incl. the wide-head halving, with N, M past one block and ragged."""
    for case in [(1, 70, 65, 16, 20), (1, 40, 35, 256, 130)]:
        (q, k, v, grad_out, grad_lse), scale = _sample(case, torch.float64, seed=2)
        got = _values_and_grads(ta.attention_forward, q, k, v, scale, grad_out, grad_lse)
        want = _values_and_grads(_oracle, q, k, v, scale, grad_out, grad_lse)
        for name, g, w in zip(NAMES, got, want):
            torch.testing.assert_close(g, w, **_tol(torch.float64), msg=lambda m: f"{name}: {m}")


def _nan_padded(t, extra):
    """t's values in a slice of a NaN-filled buffer `extra` larger in every dim: any read past t's
    ends (rows, head dim, batch) picks up NaN."""
    buf = torch.full([s + e for s, e in zip(t.shape, extra)], float("nan"), dtype=t.dtype, device=t.device)
    view = buf[tuple(slice(0, s) for s in t.shape)]
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_nan_padding_beyond_ends_is_never_read(dtype, small_tiles):
    (q, k, v, grad_out, grad_lse), scale = _sample((2, 21, 19, 12, 10), dtype, seed=3)
    clean = _values_and_grads(ta.attention_forward, q, k, v, scale, grad_out, grad_lse)
    padded = [_nan_padded(t, (1, 7, 5)) for t in (q, k, v, grad_out)]
    assert not padded[0].is_contiguous()
    got = _values_and_grads(ta.attention_forward, *padded[:3], scale, padded[3],
                            _nan_padded(grad_lse, (1, 7)))
    for name, g, c in zip(NAMES, got, clean):
        assert not g.isnan().any(), name
        assert torch.equal(g, c), name  # same values read, same arithmetic: bit-identical


def test_backward_op_with_nan_padded_saved_tensors(small_tiles):
    """The backward op read through NaN-padded out / grad_out / lse views."""
    (q, k, v, grad_out, grad_lse), scale = _sample((1, 18, 17, 5, 9), torch.float64, seed=4)
    out, lse = ta.attention_forward(q, k, v, scale)
    clean = ta.attention_backward(grad_out, grad_lse, q, k, v, out, lse, scale)
    padded = ta.attention_backward(_nan_padded(grad_out, (2, 3, 4)), _nan_padded(grad_lse, (2, 3)),
                                   *(_nan_padded(t, (2, 3, 4)) for t in (q, k, v, out)),
                                   _nan_padded(lse, (2, 3)), scale)
    for c, p in zip(clean, padded):
        assert torch.equal(c, p)


def test_noncontiguous_inputs(small_tiles):
    """Transposed and expanded (stride-0 batch) views go through the kernels' strides."""
    B, N, M, D, Dv = 2, 19, 23, 10, 6
    gen = torch.Generator().manual_seed(5)
    randn = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=gen).to(DEVICE)  # noqa: E731
    q = randn(N, B, D).transpose(0, 1)
    k = randn(1, D, M).transpose(1, 2).expand(B, M, D)
    v = randn(B, Dv, M).transpose(1, 2)
    grad_out = randn(B, Dv, N).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    got = _values_and_grads(ta.attention_forward, q, k, v, 0.4, grad_out, None)
    want = _values_and_grads(_oracle, q, k, v, 0.4, grad_out, None)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, **_tol(torch.float64), msg=lambda m: f"{name}: {m}")


def test_gradient_of_one_output_only(small_tiles):
    """Loss on out alone (grad_lse None: no lse term in delta) and on lse alone (grad_out None)."""
    (q, k, v, grad_out, grad_lse), scale = _sample(CASES[2], torch.float64, seed=6)
    got = _values_and_grads(ta.attention_forward, q, k, v, scale, grad_out, None)
    want = _values_and_grads(_oracle, q, k, v, scale, grad_out, None)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, **_tol(torch.float64), msg=lambda m: f"{name}: {m}")

    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    rins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    grads = torch.autograd.grad((ta.attention_forward(*ins, scale)[1] * grad_lse).sum(), ins,
                                allow_unused=True)
    rgrads = torch.autograd.grad((_oracle(*rins, scale)[1] * grad_lse).sum(), rins, allow_unused=True)
    assert rgrads[2] is None
    torch.testing.assert_close(grads[0], rgrads[0], **_tol(torch.float64))
    torch.testing.assert_close(grads[1], rgrads[1], **_tol(torch.float64))
    # lse does not depend on v: its gradient is zero (the kernel still returns a tensor).
    assert grads[2] is None or not grads[2].any()


def test_backward_op_matches_oracle(small_tiles):
    (q, k, v, grad_out, grad_lse), scale = _sample(CASES[0], torch.float64, seed=7)
    out, lse = ta.attention_forward(q, k, v, scale)
    for lse_grad in (grad_lse, None):
        want = _values_and_grads(_oracle, q, k, v, scale, grad_out, lse_grad)
        dq, dk, dv = ta.attention_backward(grad_out, lse_grad, q, k, v, out, lse, scale)
        for name, g, w in zip(NAMES[2:], (dq, dk, dv), want[2:]):
            torch.testing.assert_close(g, w, **_tol(torch.float64), msg=lambda m: f"{name}: {m}")


def test_gradcheck(small_tiles):
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(*s, dtype=torch.float64, generator=gen).to(DEVICE).requires_grad_(True)
               for s in ((1, 5, 3), (1, 18, 3), (1, 18, 2)))
    assert torch.autograd.gradcheck(lambda a, b, c: ta.attention_forward(a, b, c, 0.8), (q, k, v))


def test_deterministic(small_tiles):
    (q, k, v, grad_out, grad_lse), scale = _sample(CASES[2], torch.float32, seed=9)
    first = _values_and_grads(ta.attention_forward, q, k, v, scale, grad_out, grad_lse)
    second = _values_and_grads(ta.attention_forward, q, k, v, scale, grad_out, grad_lse)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_meta_shapes():
    q, k, v = (torch.empty(*s, device="meta", dtype=torch.bfloat16) for s in ((3, 7, 24), (3, 5, 24), (3, 5, 40)))
    out, lse = torch.ops.fastvid.triton_nonlocal_attention(q, k, v, 0.5)
    assert out.shape == (3, 7, 40) and out.dtype == torch.bfloat16
    assert lse.shape == (3, 7) and lse.dtype == torch.float32
    dq, dk, dv = torch.ops.fastvid.triton_nonlocal_attention_backward(out, None, q, k, v, out, lse, 0.5)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


def test_empty_batch():
    q, k, v = (torch.empty(*shape, device=DEVICE) for shape in ((0, 4, 8), (0, 3, 8), (0, 3, 2)))
    out, lse = ta.attention_forward(q, k, v, 1.0)
    assert out.shape == (0, 4, 2) and lse.shape == (0, 4)


def test_double_backward_raises():
    (q, k, v, grad_out, _), scale = _sample((1, 4, 3, 2, 2), torch.float64, seed=10)
    q.requires_grad_(True)
    out, _ = ta.attention_forward(q, k, v, scale)
    (g,) = torch.autograd.grad((out * grad_out).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), q)


def test_bad_inputs():
    q, k, v = (torch.randn(*shape, device=DEVICE) for shape in ((2, 5, 8), (2, 4, 8), (2, 4, 6)))
    f = ta.attention_forward
    with pytest.raises(ValueError, match="3-D"):
        f(q[0], k, v, 1.0)
    with pytest.raises(ValueError, match="head dim D = 8"):
        f(q, k[..., :7], v, 1.0)
    with pytest.raises(ValueError, match="key count M = 4"):
        f(q, k, v[:, :3], 1.0)
    with pytest.raises(ValueError, match="batch size"):
        f(q[:1], k, v, 1.0)
    with pytest.raises(ValueError, match="N = 0"):
        f(q[:, :0], k, v, 1.0)
    with pytest.raises(ValueError, match="M = 0"):
        f(q, k[:, :0], v[:, :0], 1.0)
    with pytest.raises(TypeError, match="dtype"):
        f(q, k.double(), v, 1.0)
    with pytest.raises(TypeError, match="float16/bfloat16/float32/float64"):
        f(q.int(), k.int(), v.int(), 1.0)
    with pytest.raises(ValueError, match="device"):
        f(q, k.to("meta"), v, 1.0)
    out, lse = f(q, k, v, 1.0)
    with pytest.raises(ValueError, match="grad_out"):
        ta.attention_backward(out[:, :4], None, q, k, v, out, lse, 1.0)
    with pytest.raises(ValueError, match="lse"):
        ta.attention_backward(out, None, q, k, v, out, lse[:, :4], 1.0)
    with pytest.raises(ValueError, match="grad_lse"):
        ta.attention_backward(out, lse[:1], q, k, v, out, lse, 1.0)


def _opcheck_cases():
    (q, k, v, grad_out, grad_lse), scale = _sample((1, 6, 5, 3, 4), torch.float64, seed=11)
    out, lse = ta.attention_forward(q, k, v, scale)
    ops = torch.ops.fastvid
    return [
        (ops.triton_nonlocal_attention, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), scale)),
        (ops.triton_nonlocal_attention, (q.detach().bfloat16(), k.detach().bfloat16(), v.detach().bfloat16(), scale)),
        (ops.triton_nonlocal_attention_backward, (grad_out, grad_lse, q.detach(), k.detach(), v.detach(), out, lse, scale)),
        (ops.triton_nonlocal_attention_backward, (grad_out, None, q.detach(), k.detach(), v.detach(), out, lse, scale)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    """Schema, autograd registration, fake-tensor and AOTAutograd (dynamic shapes) checks."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_aot_eager(small_tiles):
    (q, k, v, grad_out, grad_lse), scale = _sample(CASES[0], torch.float64, seed=12)
    ins = [t.requires_grad_(True) for t in (q, k, v)]

    def loss(a, b, c):
        out, lse = ta.attention_forward(a, b, c, scale)
        return (out * grad_out).sum() + (lse * grad_lse).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(*ins)
    expected = loss(*ins)
    torch.testing.assert_close(compiled, expected)
    for a, b in zip(torch.autograd.grad(compiled, ins), torch.autograd.grad(expected, ins)):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ wide head dims
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [(1, 5, 7, 320, 320), (1, 3, 6, 512, 512)], ids=["d320", "d512"])
def test_wide_head_dims(case, dtype):
    """D = 320, 512 (Nonlocal I3D res4): head dims walked in chunks, output columns split over
    programs, at the tiles launch_config picks; values and gradients against the fp64 oracle."""
    (q, k, v, grad_out, grad_lse), scale = _sample(case, dtype, seed=13)
    meta = ta.launch_config("fwd", dtype, case[3], case[4], *ta.device_limits(q.device), ta._INTERPRET)
    assert not meta["D_FITS"]
    got = _values_and_grads(ta.attention_forward, q, k, v, scale, grad_out, grad_lse)
    want = _values_and_grads(_oracle, q, k, v, scale, grad_out, grad_lse, torch.float64)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.double(), w, **_tol(dtype), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", [(2, 21, 19, 40, 40), (1, 18, 20, 40, 12), (1, 17, 9, 12, 40)],
                         ids=["both-chunked", "d-chunked", "dv-chunked"])
def test_chunked_head_dims(case, small_tiles, narrow_chunks):
    """Chunk paths at small sizes: D and/or Dv wider than one 16-column chunk (the other fitting),
    several query/key blocks with tails."""
    (q, k, v, grad_out, grad_lse), scale = _sample(case, torch.float64, seed=14)
    got = _values_and_grads(ta.attention_forward, q, k, v, scale, grad_out, grad_lse)
    want = _values_and_grads(_oracle, q, k, v, scale, grad_out, grad_lse)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, **_tol(torch.float64), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_low_precision_flash_style(dtype, small_tiles, narrow_chunks):
    (q, k, v, grad_out, grad_lse), scale = _sample((1, 20, 18, 40, 24), dtype, seed=15)
    got = _values_and_grads(ta.attention_forward, q, k, v, scale, grad_out, grad_lse)
    exact = _values_and_grads(_oracle, q, k, v, scale, grad_out, grad_lse, torch.float64)
    naive = _values_and_grads(_oracle, q, k, v, scale, grad_out, grad_lse, dtype)
    for name, g, e, n in zip(NAMES, got, exact, naive):
        err = (g.double() - e).abs().max().item()
        naive_err = (n.double() - e).abs().max().item()
        assert err <= 2 * naive_err + 1e-3, f"{name}: error {err:.3g} vs {dtype} oracle {naive_err:.3g}"


# ------------------------------------------------------------------------------ launch configuration
@pytest.mark.parametrize("kernel", ta.KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("D,Dv", [(16, 16), (64, 64), (128, 128), (256, 256), (512, 512), (40, 200)])
@pytest.mark.parametrize("arch", sorted(ta.SHARED_MEMORY_LIMITS))
def test_launch_config_fits_every_arch(arch, D, Dv, dtype, kernel):
    """The tiles launch_config picks fit the arch's shared memory by the model it sizes them with
    (tests/test_triton_compile.py checks the model against compiled kernels), are valid tl.dot tiles,
    and describe the GPU variant (no interpreter fixes) unless asked for the interpreter's."""
    limit = ta.SHARED_MEMORY_LIMITS[arch]
    meta = ta.launch_config(kernel, dtype, D, Dv, arch, limit)
    elem = torch.empty((), dtype=dtype).element_size()
    bn, bdv = meta["BLOCK_N"], meta["BLOCK_DV"]
    bm, bd = meta.get("BLOCK_M", 16), meta.get("BLOCK_D", 16)
    assert ta._shared_bytes(kernel, bn, bm, bd, bdv, elem, arch) <= limit
    for block in (bn, bm, bd, bdv):
        assert block >= 16 and block & (block - 1) == 0
    if kernel != "delta":
        assert meta["D_FITS"] == (ta._pad_dim(D) <= bd)
        assert meta["FIX_BF16"] is False and meta["WIDEN"] is False
        interp = ta.launch_config(kernel, dtype, D, Dv, arch, limit, interpret=True)
        assert interp["FIX_BF16"] is True and interp["WIDEN"] == (dtype == torch.bfloat16)


def test_launch_config_uses_the_device_limit():
    """Less shared memory, smaller tiles: fp32 D = 128 backward at H100's limit vs RTX 4090's."""
    big = ta.launch_config("dkdv", torch.float32, 128, 128, (8, 0), ta.SHARED_MEMORY_LIMITS[(8, 0)])
    small = ta.launch_config("dkdv", torch.float32, 128, 128, (8, 9), ta.SHARED_MEMORY_LIMITS[(8, 9)])
    size = lambda m: m["BLOCK_N"] * m["BLOCK_M"] * m["BLOCK_D"] * m["BLOCK_DV"]  # noqa: E731
    assert size(small) < size(big)
    with pytest.raises(RuntimeError, match="shared memory"):
        ta.launch_config("fwd", torch.float64, 64, 64, (9, 0), 1024)


# ------------------------------------------------------------------------------ CUDA routing
@pytest.mark.parametrize("dtype,D,Dv,capability,expected", [
    (torch.float16, 64, 64, (8, 0), "sdpa"),
    (torch.bfloat16, 256, 256, (9, 0), "sdpa"),
    (torch.float32, 128, 64, (8, 9), "sdpa"),
    (torch.float64, 64, 64, (9, 0), "triton"),      # SDPA: math path only
    (torch.float32, 512, 512, (8, 0), "triton"),    # Nonlocal I3D res4
    (torch.float16, 512, 512, (9, 0), "triton"),
    (torch.bfloat16, 64, 320, (10, 0), "triton"),   # a wide value dim alone
    (torch.bfloat16, 512, 512, (7, 5), "sdpa"),     # no bf16 tl.dot before sm_80
    (torch.float16, 512, 512, (7, 5), "triton"),
])
def test_cuda_attention_routing(dtype, D, Dv, capability, expected):
    from fastvid.ops.attention import cuda_attention_kernel
    assert cuda_attention_kernel(dtype, D, Dv, capability) == expected


def test_cuda_backend_runs_triton_where_sdpa_would_be_quadratic(monkeypatch):
    """The cuda backend's wiring, on CPU tensors: an fp64 call (routed to Triton) never reaches SDPA
    and matches the oracle; an fp32 D = 64 call goes to SDPA."""
    import fastvid
    from fastvid import _backend
    from fastvid.ops import attention as ops_attention

    sdpa_calls = []

    def fake_sdpa(q, k, v, scale=None):
        sdpa_calls.append(q.dtype)
        return torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)

    monkeypatch.setattr(_backend, "resolve", lambda tensors: "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(ops_attention.F, "scaled_dot_product_attention", fake_sdpa)
    (q, k, v, _, _), scale = _sample((2, 9, 11, 24, 20), torch.float64, seed=16)
    with fastvid.backend("auto"):
        out = ops_attention.nonlocal_attention(q, k, v, scale)
        assert sdpa_calls == []
        torch.testing.assert_close(out, _oracle(q, k, v, scale)[0], **_tol(torch.float64))
        ops_attention.nonlocal_attention(q.float(), k.float(), v.float(), scale)
    assert sdpa_calls == [torch.float32]


# ------------------------------------------------------------------------------ device guard
def test_device_guard_selects_the_tensors_device():
    """device_guard makes a CUDA tensor's device current (Triton launches on the current device and
    its current stream); nothing for CPU tensors. Only ``.device`` is read: a stand-in will do here."""
    import contextlib
    from types import SimpleNamespace

    from fastvid.triton_kernels import _common

    guard = _common.device_guard(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_common.device_guard(torch.empty(1)), contextlib.nullcontext)


def test_launches_inside_device_guard(monkeypatch, small_tiles):
    from _triton_guard import launch_devices

    (q, k, v, grad_out, grad_lse), scale = _sample((1, 20, 18, 8, 8), torch.float64, seed=17)
    with launch_devices(monkeypatch, ta) as launches:
        _values_and_grads(ta.attention_forward, q, k, v, scale, grad_out, grad_lse)
    assert len(launches) == 4 and launches == [q.device] * 4  # fwd, delta, dK/dV, dQ


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: values and gradients as on the CPU oracle."""
    (q, k, v, grad_out, grad_lse), scale = _sample((2, 37, 21, 16, 16), torch.float32, seed=18)
    with torch.cuda.device(0):
        got = _values_and_grads(ta.attention_forward, *(t.to("cuda:1") for t in (q, k, v)), scale,
                                grad_out.to("cuda:1"), grad_lse.to("cuda:1"))
    want = _values_and_grads(_oracle, *(t.cpu() for t in (q, k, v)), scale, grad_out.cpu(),
                             grad_lse.cpu(), torch.float64)
    for name, g, w in zip(NAMES, got, want):
        assert g.device == torch.device("cuda", 1), name
        torch.testing.assert_close(g.double().cpu(), w, **_tol(torch.float32),
                                   msg=lambda m: f"{name}: {m}")


def test_forced_triton_backend_wide_head_dim():
    """fastvid.backend("triton") runs the Triton kernel for D = 512 through the public op (it used to
    reject D > 256)."""
    import fastvid
    from fastvid.ops.attention import nonlocal_attention

    (q, k, v, grad_out, _), scale = _sample((1, 4, 6, 512, 512), torch.float64, seed=19)
    with fastvid.backend("triton"):
        got = _values_and_grads(lambda a, b, c, s: (nonlocal_attention(a, b, c, s), None),
                                q, k, v, scale, grad_out, None)
    want = _values_and_grads(_oracle, q, k, v, scale, grad_out, None)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], want[:1] + want[2:]):
        torch.testing.assert_close(g, w, **_tol(torch.float64), msg=lambda m: f"{name}: {m}")
