"""Nonlocal attention ops: torch.ops.fastvid.nonlocal_attention(_backward) and
fastvid.ops.nonlocal_attention / dot_product_attention / concatenation_attention against explicit
softmax(scale q kᵀ) v computed in float64 (the oracle materialises the N×M matrix).

Tolerances follow tests/_tolerances.py: bf16/fp16 by the flash-attention rule with the fp64 oracle
rounded once to the dtype as yardstick (the kernels compute in fp32 and round at the store).
"""
import math

import pytest
import torch
from _isa import cpu_isa  # noqa: F401 (fixture: every CPU ISA path)
from conftest import requires_cuda

import fastvid
from fastvid.ops import concatenation_attention, dot_product_attention, nonlocal_attention
from _tolerances import assert_full_precision, assert_low_precision, full_precision_tol

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")

OPS = torch.ops.fastvid

# (B, N, M, D, Dv): the CPU kernel's tiles are 120 queries × 480 keys, so these cover one and several
# tiles in each direction, partial last tiles, N = M = 1, D != Dv, D not a multiple of the SIMD width.
# The fp32 tile GEMM (attention_cpu_gemm.h) works in blocks of 12 (AVX-512) / 6 rows × 2 vectors of
# columns: the last two shapes put partial row blocks and partial column panels (one vector and
# less) in every product at the head dims 128 and 32.
SHAPES = [
    (2, 70, 600, 17, 9),
    (1, 1, 1, 3, 2),
    (1, 300, 37, 8, 5),
    (2, 129, 513, 64, 32),
    (1, 5, 1030, 256, 256),
    (1, 131, 520, 128, 48),
    (3, 25, 45, 32, 128),
    (1, 240, 960, 32, 16),  # whole tiles only: no partial row block in any product
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# bf16 runs two ways: tiles multiplied in bf16 (the path for CPUs with AMX-BF16) and the fp32 kernel
# on upcast copies (elsewhere); FASTVID_ATTENTION_BF16_TILES forces either on any machine.
DTYPE_PATHS = [pytest.param(torch.float64, None, id="float64"), pytest.param(torch.float32, None, id="float32"),
               pytest.param(torch.bfloat16, "1", id="bfloat16-tiles"),
               pytest.param(torch.bfloat16, "0", id="bfloat16-upcast")]
LAYOUTS = ["contiguous", "transposed", "noncontiguous"]


def oracle(q, k, v, scale, dtype=torch.float64):
    """softmax(scale q kᵀ) v and the row log-sum-exp, computed naively in `dtype`."""
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v.to(dtype)), torch.logsumexp(scores.double(), dim=-1)


def make(shape, dtype, layout, seed=0):
    """q, k, v with the given layout: 'transposed' stores each as [B, dim, rows] (a channels-first
    projection's transpose), 'noncontiguous' slices every other row of a bigger tensor."""
    g = torch.Generator().manual_seed(seed)
    B, N, M, D, Dv = shape
    out = []
    for rows, dim in ((N, D), (M, D), (M, Dv)):
        if layout == "transposed":
            t = torch.randn(B, dim, rows, generator=g).to(dtype).transpose(1, 2)
        elif layout == "noncontiguous":
            t = torch.randn(B, 2 * rows, dim + 3, generator=g).to(dtype)[:, ::2, 1:dim + 1]
        else:
            t = torch.randn(B, rows, dim, generator=g).to(dtype)
        out.append(t.requires_grad_())
    return out


def tolerance(dtype):
    """``assert_close`` arguments for a float32 / float64 result of magnitude ~1 (tests/_tolerances.py)."""
    return full_precision_tol(dtype)


def assert_close_to_oracle(name, ours, exact, low_precision_run=None, dtype=None):
    """``ours`` against the fp64 ``exact`` by tests/_tolerances.py. ``low_precision_run`` (the oracle
    run in bf16) is no longer the yardstick: the oracle rounded once to the dtype is, as the kernel
    computes in fp32 and rounds at the store; the argument stays for callers that still pass it."""
    if ours.dtype in (torch.bfloat16, torch.float16):
        assert_low_precision(ours, exact, ours.dtype, name)
    else:
        assert_full_precision(ours, exact, name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,bf16_tiles", DTYPE_PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_oracle(shape, dtype, bf16_tiles, layout, cpu_isa, monkeypatch):
    if bf16_tiles is not None:
        monkeypatch.setenv("FASTVID_ATTENTION_BF16_TILES", bf16_tiles)
    q, k, v = make(shape, dtype, layout)
    scale = 0.7 / math.sqrt(shape[3])
    out, lse, _ = OPS.nonlocal_attention(q, k, v, scale)
    assert out.shape == (shape[0], shape[1], shape[4]) and out.dtype == dtype and out.is_contiguous()
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g).to(dtype)
    grad_lse = torch.randn(lse.shape, generator=g).to(lse.dtype)
    grads = torch.autograd.grad((out * grad_out).sum() + (lse * grad_lse).sum(), (q, k, v))

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact_out, exact_lse = oracle(*leaves, scale)
    exact_grads = torch.autograd.grad((exact_out * grad_out.double()).sum() + (exact_lse * grad_lse.double()).sum(),
                                      leaves)
    for name, ours, exact in zip(["out", "lse", "grad_q", "grad_k", "grad_v"], [out, lse, *grads],
                                 [exact_out, exact_lse, *exact_grads]):
        assert_close_to_oracle(name, ours, exact)


def _values_and_grads(q, k, v, scale, grad_out, grad_lse):
    out, lse, _ = OPS.nonlocal_attention(q, k, v, scale)
    return [out, lse, *torch.autograd.grad((out * grad_out).sum() + (lse * grad_lse).sum(), (q, k, v))]


def _oracle_values_and_grads(q, k, v, scale, grad_out, grad_lse, dtype=torch.float64):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = oracle(*leaves, scale, dtype=dtype)
    total = (out * grad_out.to(dtype)).sum() + (lse * grad_lse.double()).sum()
    return [out, lse, *torch.autograd.grad(total, leaves)]


# The kernel keeps scores in log2 units and moves a row's running max only when a key tile's max
# exceeds it by more than 8 (log2 units, = 8 ln 2 ≈ 5.5 in natural units); these key-tile offsets
# (natural units, one per 480-key tile) make later tiles stay under, cross, or fall below that.
KEY_TILE = 480  # kKeyBlock in csrc/attention/attention_cpu.cpp
TILE_OFFSETS = {
    "under_threshold": (0.0, 3.0, 5.0),     # max grows by 4.3 then 2.9 binary orders: no rescale
    "crosses_threshold": (0.0, 12.0, 30.0),  # grows by 17 then 26 binary orders: two rescales
    "decreasing": (30.0, 0.0, -30.0),        # the first tile holds the max
    "large_logits": (-300.0, 400.0, 350.0),  # exp of the raw scores overflows float32
}


@pytest.mark.parametrize("dtype,bf16_tiles", DTYPE_PATHS)
@pytest.mark.parametrize("offsets", TILE_OFFSETS.values(), ids=TILE_OFFSETS.keys())
def test_running_max_across_key_tiles(offsets, dtype, bf16_tiles, monkeypatch):
    """Key tiles whose scores jump by less or more than the lazy-rescale threshold, or fall, or are
    far beyond float32's exp range: values, lse and gradients match the fp64 oracle."""
    if bf16_tiles is not None:
        monkeypatch.setenv("FASTVID_ATTENTION_BF16_TILES", bf16_tiles)
    B, N, M, D, Dv = 2, 70, 3 * KEY_TILE, 16, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, D, generator=g) * 0.3
    k = torch.randn(B, M, D, generator=g) * 0.3
    q[..., 0] = 1.0  # score = offset of the key's tile + noise
    k[..., 0] = torch.tensor(offsets).repeat_interleave(KEY_TILE)
    v = torch.randn(B, M, Dv, generator=g)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(B, N, Dv, generator=g).to(dtype)
    grad_lse = torch.randn(B, N, generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32)
    ours = _values_and_grads(q, k, v, 1.0, grad_out, grad_lse)
    exact = _oracle_values_and_grads(q, k, v, 1.0, grad_out, grad_lse)
    low = _oracle_values_and_grads(q, k, v, 1.0, grad_out, grad_lse, dtype) if dtype == torch.bfloat16 else [None] * 5
    for name, a, e, lp in zip(["out", "lse", "grad_q", "grad_k", "grad_v"], ours, exact, low):
        assert torch.isfinite(a).all(), name
        if dtype == torch.bfloat16:
            assert_close_to_oracle(name, a, e, lp, dtype)
        else:
            # Logits of magnitude L are rounded (and lse stored) to eps·L absolute, which scales a
            # whole row of P by up to (1 ± eps·L): every output moves by up to eps·L times its size.
            logit_error = torch.finfo(dtype).eps * exact[1].abs().max().item() * e.abs().max().item()
            tol = tolerance(dtype)
            torch.testing.assert_close(a.double(), e, rtol=tol["rtol"], atol=tol["atol"] + logit_error, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_minus_inf_scores(dtype):
    """Scores of -inf (key rows with a -inf entry). Keys 0..599 at -inf: every query's first key tile
    is all -inf and its softmax comes from the later keys, as torch.softmax's does. Every key at -inf
    (batch 0): NaN output and lse -inf like torch.softmax / logsumexp, batch 1 untouched."""
    B, N, M, D, Dv = 2, 40, 1100, 8, 5
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, rows, dim, generator=g, dtype=dtype) for rows, dim in ((N, D), (M, D), (M, Dv)))
    q[..., 0] = 1.0
    k[:, :600, 0] = float("-inf")
    out, lse, _ = OPS.nonlocal_attention(q, k, v, 0.7)
    exact_out, exact_lse = oracle(q, k, v, 0.7)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), exact_out, **tolerance(dtype))
    torch.testing.assert_close(lse.double(), exact_lse, **tolerance(dtype))

    k[0, :, 0] = float("-inf")
    out, lse, _ = OPS.nonlocal_attention(q, k, v, 0.7)
    assert out[0].isnan().all() and (lse[0] == float("-inf")).all()
    exact_out, exact_lse = oracle(q[1:], k[1:], v[1:], 0.7)
    torch.testing.assert_close(out[1:].double(), exact_out, **tolerance(dtype))
    torch.testing.assert_close(lse[1:].double(), exact_lse, **tolerance(dtype))


def test_heads_and_default_scale():
    """[B, heads, N, D] inputs: each head attends on its own; default scale 1/sqrt(D)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, d, generator=g, dtype=torch.float64) for n, d in ((40, 16), (25, 16), (25, 8)))
    out = nonlocal_attention(q, k, v)
    assert out.shape == (2, 3, 40, 8)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(out[b, h], oracle(q[b, h], k[b, h], v[b, h], 16 ** -0.5)[0])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_public_op_backends_agree(backend):
    q, k, v = make((2, 150, 530, 12, 7), torch.float32, "transposed")
    with fastvid.backend(backend):
        out = nonlocal_attention(q, k, v, 0.5)
    torch.testing.assert_close(out.double(), oracle(q, k, v, 0.5)[0], rtol=2e-5, atol=2e-5)


def test_gradcheck():
    q, k, v = make((2, 9, 7, 5, 4), torch.float64, "transposed")
    with fastvid.backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b, c: nonlocal_attention(a, b, c, 0.8), (q, k, v))


def test_gradcheck_lse_output():
    q, k, v = make((1, 6, 5, 3, 2), torch.float64, "contiguous")
    assert torch.autograd.gradcheck(lambda a, b, c: OPS.nonlocal_attention(a, b, c, 1.3), (q, k, v))


def test_nan_padding_is_never_read():
    """Operands that are windows into NaN-filled buffers (padding after every row, after the last row
    and after the last batch) give NaN-free results equal to clean copies': no out-of-bounds reads.
    (Equal up to rounding, not bits: the BLAS may block differently for another row stride.)"""
    B, N, M, D, Dv = 2, 140, 520, 10, 6
    g = torch.Generator().manual_seed(0)
    clean = [torch.randn(B, rows, dim, generator=g) for rows, dim in ((N, D), (M, D), (M, Dv))]
    padded = []
    for t in clean:
        buffer = torch.full((B + 1, t.shape[1] + 5, t.shape[2] + 3), float("nan"))
        buffer[:B, :t.shape[1], :t.shape[2]] = t
        padded.append(buffer[:B, :t.shape[1], :t.shape[2]].requires_grad_())
    clean = [t.requires_grad_() for t in clean]
    results = []
    for q, k, v in (clean, padded):
        out, lse, _ = OPS.nonlocal_attention(q, k, v, 0.3)
        grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
        results.append([out, lse, *grads])
    for a, b in zip(*results):
        assert not b.isnan().any()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["transposed", "padded"])
def test_backward_reads_strided_grad_out(layout):
    """grad_out as the transpose of a [B, Dv, N] tensor, or with padded rows, gives the same gradients
    as a contiguous grad_out."""
    q, k, v = make((2, 300, 530, 12, 7), torch.float64, "contiguous")
    out, lse, _ = OPS.nonlocal_attention(q.detach(), k.detach(), v.detach(), 0.5)
    grad = torch.randn(out.shape, dtype=torch.float64)
    strided = grad.transpose(1, 2).contiguous().transpose(1, 2) if layout == "transposed" else \
        torch.cat([grad, torch.full_like(grad[..., :3], float("nan"))], dim=-1)[..., :7]
    assert not strided.is_contiguous()
    expected = OPS.nonlocal_attention_backward(grad, None, q.detach(), k.detach(), v.detach(), out, lse, 0.5)
    got = OPS.nonlocal_attention_backward(strided, None, q.detach(), k.detach(), v.detach(), out, lse, 0.5)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_deterministic():
    q, k, v = make((3, 200, 700, 16, 16), torch.float32, "contiguous")
    runs = []
    for _ in range(2):
        out, lse, _ = OPS.nonlocal_attention(q, k, v, 0.25)
        runs.append([out, lse, *torch.autograd.grad(out.square().sum(), (q, k, v))])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_opcheck():
    for layout in ("contiguous", "transposed"):
        q, k, v = make((2, 20, 11, 6, 5), torch.float32, layout)
        torch.library.opcheck(OPS.nonlocal_attention.default, (q, k, v, 0.4))
        out, lse, _ = OPS.nonlocal_attention(q.detach(), k.detach(), v.detach(), 0.4)
        for grad_lse in (None, torch.randn_like(lse)):
            torch.library.opcheck(OPS.nonlocal_attention_backward.default,
                                  (torch.randn_like(out), grad_lse, q.detach(), k.detach(), v.detach(), out, lse, 0.4))


@pytest.mark.parametrize("save_scores", [False, True])
def test_compile_fullgraph(save_scores):
    """The compiled graph (fake kernel + autograd formula) against the fp64 oracle, output and all grads."""
    q, k, v = make((2, 33, 17, 8, 8), torch.float32, "transposed")
    compiled = torch.compile(lambda a, b, c: nonlocal_attention(a, b, c, 0.5, save_scores=save_scores), fullgraph=True)
    out = compiled(q, k, v)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = oracle(*leaves, 0.5)[0]
    assert_full_precision(out, exact, "compiled output")
    grad_out = torch.randn(out.shape)
    for name, a, e in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out),
                          torch.autograd.grad(exact, leaves, grad_out.double())):
        assert_full_precision(a, e, f"compiled grad_{name}")


# ------------------------------------------------------------------------------ save_scores
SAVED_SHAPES = [(2, 129, 513, 64, 32), (1, 131, 520, 128, 48), (2, 70, 600, 17, 9)]


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype,bf16_tiles", DTYPE_PATHS)
@pytest.mark.parametrize("shape", SAVED_SHAPES, ids=["x".join(map(str, s)) for s in SAVED_SHAPES])
def test_saved_scores_match_oracle_and_recompute(shape, dtype, bf16_tiles, layout, cpu_isa, monkeypatch):
    """save_scores: the scores output is scale · q kᵀ (fp64 oracle), and the backward that reads them gives
    the oracle's gradients and the recomputing backward's bits (the same products, in the same order)."""
    if bf16_tiles is not None:
        monkeypatch.setenv("FASTVID_ATTENTION_BF16_TILES", bf16_tiles)
    q, k, v = make(shape, dtype, layout)
    scale = 0.7 / math.sqrt(shape[3])
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(shape[0], shape[1], shape[4], generator=g).to(dtype)
    grad_lse = torch.randn(shape[0], shape[1], generator=g)
    runs = {}
    for save in (False, True):
        out, lse, scores = OPS.nonlocal_attention(q, k, v, scale, save)
        runs[save] = [out, lse, *torch.autograd.grad((out * grad_out).sum() + (lse * grad_lse.to(lse.dtype)).sum(),
                                                     (q, k, v))]
        assert scores.shape == ((shape[0], shape[1], shape[2]) if save else (0,)) and scores.dtype == lse.dtype
        assert not scores.requires_grad
        if save:
            exact_scores = torch.matmul(q.detach().double(), k.detach().double().transpose(1, 2)) * scale
            assert_full_precision(scores, exact_scores, "scores")
    exact = _oracle_values_and_grads(q, k, v, scale, grad_out, grad_lse)
    for name, ours, e in zip(["out", "lse", "grad_q", "grad_k", "grad_v"], runs[True], exact):
        assert_close_to_oracle(name, ours, e)
    for name, saved, recomputed in zip(["out", "lse", "grad_q", "grad_k", "grad_v"], runs[True], runs[False]):
        assert torch.equal(saved, recomputed), f"{name}: saved scores changed the result"


def test_backward_reads_the_saved_scores():
    """Given the scores (and lse, out) of another query q2, the backward's dV is P2ᵀ dO, which depends on
    the scores alone: it matches the oracle's dV for q2. Recomputing from q (no scores) would not."""
    q, k, v = make((2, 150, 530, 12, 7), torch.float64, "contiguous")
    q2 = make((2, 150, 530, 12, 7), torch.float64, "contiguous", seed=5)[0]
    grad_out = torch.randn(2, 150, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out2, lse2, scores2 = OPS.nonlocal_attention(q2.detach(), k.detach(), v.detach(), 0.5, True)
    expected_dv = _oracle_values_and_grads(q2, k, v, 0.5, grad_out, torch.zeros(2, 150))[4]
    args = (grad_out, None, q.detach(), k.detach(), v.detach(), out2, lse2, 0.5)
    torch.testing.assert_close(OPS.nonlocal_attention_backward(*args, scores2)[2], expected_dv)
    assert not torch.allclose(OPS.nonlocal_attention_backward(*args)[2], expected_dv, rtol=1e-3, atol=1e-3)


def _dispatched(fn):
    """(op, args, kwargs, result) of every operator dispatched while fn runs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            result = func(*args, **kwargs)
            calls.append((func, args, kwargs, result))
            return result

    with Record():
        fn()
    return calls


def _attention_calls(fn):
    """The save_scores argument of every fastvid.nonlocal_attention dispatched while fn runs."""
    return [bool(args[4]) if len(args) > 4 else bool(kwargs.get("save_scores", False))
            for func, args, kwargs, _ in _dispatched(fn) if func is OPS.nonlocal_attention.default]


def test_save_scores_only_where_a_backward_reads_them():
    """The public op asks the kernel for the scores only with save_scores, grad mode on and an input that
    needs a gradient; the saved scores reach the backward (a [B, N, M] fp32 tensor among the saved ones)."""
    q, k, v = make((2, 40, 30, 8, 8), torch.float32, "contiguous")
    assert _attention_calls(lambda: nonlocal_attention(q, k, v, save_scores=True)) == [True]
    assert _attention_calls(lambda: nonlocal_attention(q, k, v)) == [False]
    with torch.no_grad():
        assert _attention_calls(lambda: nonlocal_attention(q, k, v, save_scores=True)) == [False]
    detached = [t.detach() for t in (q, k, v)]
    assert _attention_calls(lambda: nonlocal_attention(*detached, save_scores=True)) == [False]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        nonlocal_attention(q, k, v, save_scores=True)
    assert (2, 40, 30) in saved


def test_backward_makes_no_zero_gradient_for_the_scores():
    """The scores output gets no gradient; the backward must not be handed a B·N·M tensor of zeros for it
    (autograd materialises missing output gradients unless told not to: 79 MB written per call at the
    benchmark's shape, which cost more than the saved product)."""
    q, k, v = make((2, 40, 30, 8, 8), torch.float32, "contiguous")
    out = nonlocal_attention(q, k, v, save_scores=True)
    made = [tuple(t.shape) for *_, result in _dispatched(lambda: out.backward(torch.ones_like(out)))
            for t in (result if isinstance(result, (tuple, list)) else [result]) if isinstance(t, torch.Tensor)]
    assert (2, 40, 30) not in made
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_save_scores_bad_input():
    q, k, v = make((2, 40, 30, 8, 8), torch.float32, "contiguous")
    with pytest.raises(TypeError, match="save_scores must be a bool"):
        nonlocal_attention(q, k, v, save_scores=1)
    out, lse, scores = OPS.nonlocal_attention(q.detach(), k.detach(), v.detach(), 0.5, True)
    args = (torch.randn_like(out), None, q.detach(), k.detach(), v.detach(), out, lse, 0.5)
    for wrong in (scores[:, :, :-1], scores.double(), scores[:1]):
        with pytest.raises(RuntimeError, match=r"scores must be \[2, 40, 30\] Float"):
            OPS.nonlocal_attention_backward(*args, wrong)
    # The forward's empty scores (save_scores off) are the same as none.
    empty = OPS.nonlocal_attention(q.detach(), k.detach(), v.detach(), 0.5)[2]
    for a, b in zip(OPS.nonlocal_attention_backward(*args, empty), OPS.nonlocal_attention_backward(*args)):
        assert torch.equal(a, b)
    # Saved tensors on another device (meta) are refused, not read as garbage by the fake kernel.
    for index, name in ((5, "out"), (6, "lse"), (8, "scores")):
        bad = list(args) + [scores]
        bad[index] = torch.empty(bad[index].shape, device="meta")
        with pytest.raises(RuntimeError, match=f"one device.*{name} on meta"):
            OPS.nonlocal_attention_backward(*bad)
    # A transposed copy of the right values is read in its own layout (made contiguous).
    strided = scores.transpose(1, 2).contiguous().transpose(1, 2)
    for a, b in zip(OPS.nonlocal_attention_backward(*args, strided), OPS.nonlocal_attention_backward(*args, scores)):
        assert torch.equal(a, b)


def test_save_scores_not_frozen_into_an_exported_program():
    """torch.export traces with gradients on; an exported program mostly runs without autograd, so the trace
    must not record the scores (they would be computed and stored on every call)."""
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return nonlocal_attention(q, k, v, save_scores=True)

    q, k, v = make((2, 20, 11, 6, 5), torch.float32, "contiguous")
    program = torch.export.export(Attend(), (q, k, v))
    calls = [n for n in program.graph.nodes if n.target is OPS.nonlocal_attention.default]
    assert len(calls) == 1 and calls[0].args[4:] in ((), (False,))
    torch.testing.assert_close(program.module()(q, k, v), nonlocal_attention(q, k, v))


def test_save_scores_opcheck():
    q, k, v = make((2, 20, 11, 6, 5), torch.float32, "transposed")
    torch.library.opcheck(OPS.nonlocal_attention.default, (q, k, v, 0.4, True))
    out, lse, scores = OPS.nonlocal_attention(q.detach(), k.detach(), v.detach(), 0.4, True)
    torch.library.opcheck(OPS.nonlocal_attention_backward.default,
                          (torch.randn_like(out), None, q.detach(), k.detach(), v.detach(), out, lse, 0.4, scores))


def test_autocast_bf16():
    """Under bf16 autocast q, k, v are rounded to bf16 and the output stored in bf16: the flash-attention
    rule against the fp64 oracle of the fp32 inputs, with the fp64 oracle of the rounded inputs, rounded
    to bf16, as yardstick."""
    q, k, v = make((1, 30, 20, 8, 8), torch.float32, "contiguous")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nonlocal_attention(q, k, v, 0.5)
    yardstick = oracle(*(t.bfloat16() for t in (q, k, v)), 0.5)[0].bfloat16()
    assert_low_precision(out, oracle(q, k, v, 0.5)[0], torch.bfloat16, "output under autocast", yardstick=yardstick)


@pytest.mark.parametrize("op", [nonlocal_attention, dot_product_attention], ids=lambda f: f.__name__)
def test_autocast_with_mixed_input_dtypes(op):
    """Under autocast q, k, v often arrive in different dtypes (q from a projection run in bf16, k and v as
    stored, as in TemporalAttention(score='general')): autocast casts them all first, as for SDPA, instead
    of the "must share a dtype" error meant for calls outside autocast (which still raise). The result is
    the op on the three cast to bf16, and its q/k/v gradients come back in each input's dtype."""
    q, k, v = make((2, 30, 20, 8, 8), torch.float32, "contiguous")
    q_bf16 = q.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(q_bf16, k, v)
    assert out.dtype == torch.bfloat16
    expected = op(q_bf16.detach(), k.detach().bfloat16(), v.detach().bfloat16())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grads = torch.autograd.grad(out.float().sum(), (q_bf16, k, v))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    with pytest.raises(TypeError, match="must share a dtype"):
        op(q_bf16, k, v)


def test_double_backward_raises():
    q, k, v = make((1, 4, 3, 2, 2), torch.float64, "contiguous")
    out = nonlocal_attention(q, k, v)
    (grad_q,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_q.sum().backward()


# ======================================================================================= bad input
def _qkv(shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype) if dtype.is_floating_point else torch.ones(s, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("shapes,dtype,match", [
    (((4, 8), (2, 3, 8), (2, 3, 5)), torch.float32, "3-D"),
    (((2, 4, 8), (2, 3, 7), (2, 3, 5)), torch.float32, "same last dim D"),
    (((2, 4, 8), (3, 3, 8), (3, 3, 5)), torch.float32, "same batch size"),
    (((2, 4, 8), (2, 3, 8), (2, 2, 5)), torch.float32, "same number of rows M"),
    (((2, 4, 8), (2, 0, 8), (2, 0, 5)), torch.float32, "one key"),
    (((2, 4, 8), (2, 3, 8), (2, 3, 5)), torch.int32, "float"),
])
def test_bad_input(shapes, dtype, match):
    q, k, v = _qkv(shapes, dtype)
    with pytest.raises((ValueError, TypeError), match=match):
        nonlocal_attention(q, k, v)
    with pytest.raises(RuntimeError, match=match):
        OPS.nonlocal_attention(q, k, v, 1.0)


def test_the_raw_op_refuses_no_queries():
    q, k, v = _qkv(((2, 0, 8), (2, 3, 8), (2, 3, 5)))
    with pytest.raises(RuntimeError, match="at least one query"):
        OPS.nonlocal_attention(q, k, v, 1.0)


@pytest.mark.parametrize("heads", [False, True])
def test_no_queries_give_an_empty_result(heads):
    """N = 0 (as a batch of 0): an empty [B, 0, Dv] result and zero gradients for k and v, as SDPA gives;
    it was refused. The dot-product form likewise."""
    lead = (2, 3) if heads else (2,)
    q, k, v = (torch.randn(*lead, n, d, requires_grad=True) for n, d in ((0, 8), (4, 8), (4, 5)))
    out = nonlocal_attention(q, k, v)
    assert out.shape == (*lead, 0, 5)
    out.sum().backward()
    assert q.grad.shape == q.shape
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))
    if not heads:
        assert dot_product_attention(q, k, v).shape == (2, 0, 5)


def test_bad_input_fp16_on_cpu_kernel():
    q, k, v = _qkv(((1, 4, 8), (1, 3, 8), (1, 3, 5)), torch.float16)
    with pytest.raises(RuntimeError, match="float32, float64 and bfloat16"):
        OPS.nonlocal_attention(q, k, v, 1.0)


def test_public_op_fp16_on_cpu():
    """fp16 CPU tensors run through the fp32 kernel and come back fp16: output and the gradients of q,
    k and v against the fp64 oracle by the flash-attention rule (not only their dtype and finiteness)."""
    q, k, v = make((1, 40, 30, 8, 4), torch.float16, "contiguous")
    out = nonlocal_attention(q, k, v, 0.5)
    grad_out = torch.randn(out.shape).half()
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = oracle(*leaves, 0.5)[0]
    exact_grads = torch.autograd.grad(exact, leaves, grad_out.double())
    assert_low_precision(out, exact, torch.float16, "output")
    for name, a, e in zip("qkv", grads, exact_grads):
        assert_low_precision(a, e, torch.float16, f"grad_{name}")


def test_heads_mismatch():
    with pytest.raises(ValueError, match="heads"):
        nonlocal_attention(torch.randn(2, 3, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8))


# ======================================================================================= other nonlocal forms
def test_dot_product_attention_matches_explicit_matrix():
    q, k, v = make((2, 30, 12, 6, 5), torch.float64, "transposed")
    out = dot_product_attention(q, k, v)
    expected = torch.matmul(torch.matmul(q, k.transpose(1, 2)) / k.shape[1], v)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), (q, k, v)),
                               torch.autograd.grad(expected.sum(), (q, k, v)))


@pytest.mark.parametrize("chunk", [1 << 22, 50])  # one chunk; many chunks with recomputation
def test_concatenation_attention_matches_explicit_matrix(chunk):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 23, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    out = concatenation_attention(a, b, v, max_chunk_elements=chunk)
    expected = torch.matmul(torch.relu(a[:, :, None] + b[:, None, :]) / 9, v)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), (a, b, v)),
                               torch.autograd.grad(expected.square().sum(), (a, b, v)))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_sdpa_path(dtype):
    q, k, v = (t.detach().cuda().requires_grad_() for t in make((2, 70, 600, 64, 64), dtype, "contiguous"))
    out = nonlocal_attention(q, k, v, 0.125)
    exact = oracle(q, k, v, 0.125)[0]
    if dtype == torch.bfloat16:
        # SDPA's fused kernels round the probabilities to bf16 before P·V: one more rounding than the
        # oracle rounded once, hence 2 ulps of slack (not verified on a GPU yet)
        assert_low_precision(out, exact, dtype, "sdpa output", ulps=2.0)
    else:
        # fp32 blocked reductions over M = 600 keys (TF32 is off for SDPA): 2^10 ulps (not verified on a GPU yet)
        assert_full_precision(out, exact, "sdpa output", ulps=2.0 ** 10)


def test_value_gradient_exact_when_one_score_dominates(cpu_isa):
    """Scores of ~6e4 (inputs x100 into a block with scale 1), one key dominating each row: P of that key
    is 1, so dV = Pᵀ dO is exact in fp32 (as plain PyTorch and SDPA give it). The kernel kept scores in
    log2 units while the fp32 lse it saves is in natural units: their rounding at 6e4 put P, and dV,
    off by ~0.2 % (5e-3 against 5e-7). dQ and dK are judged against PyTorch's SDPA, which shares the
    flash backward's cancellation in dP - rowsum(dO ∘ O) there."""
    g = torch.Generator().manual_seed(3)
    q64, k64, v64 = (torch.randn(2, n, 8, generator=g, dtype=torch.float64) * s for n, s in ((40, 90), (24, 90), (24, 1)))
    go = torch.randn(2, 40, 8, generator=g, dtype=torch.float64)

    def grads(f, dtype):
        ins = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
        return [t.double() for t in torch.autograd.grad(f(*ins), ins, go.to(dtype))]
    exact = grads(lambda q, k, v: torch.softmax(q @ k.transpose(1, 2), -1) @ v, torch.float64)
    plain = grads(lambda q, k, v: torch.softmax(q @ k.transpose(1, 2), -1) @ v, torch.float32)
    sdpa = grads(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0), torch.float32)
    ours = grads(lambda q, k, v: nonlocal_attention(q, k, v, scale=1.0), torch.float32)
    assert (q64 @ k64.transpose(1, 2)).abs().max() > 1e4  # the premise: large scores
    err = lambda a, b: (a - b).abs().max().item()
    eps = torch.finfo(torch.float32).eps
    assert err(ours[2], exact[2]) <= 2 * err(plain[2], exact[2]) + 4 * eps * exact[2].abs().max().item(), "dV"
    for i, name in ((0, "dQ"), (1, "dK")):
        assert err(ours[i], exact[i]) <= 2 * err(sdpa[i], exact[i]) + 4 * eps * exact[i].abs().max().item(), name


@pytest.mark.parametrize("shapes,dtypes,error,match", [
    (((2, 3), (2, 0), (2, 0, 4)), None, ValueError, "need at least one key, got M = 0"),
    (((2, 3), (3, 5), (3, 5, 4)), None, ValueError, "must agree in B and M"),
    (((2, 3), (2, 5), (2, 6, 4)), None, ValueError, "must agree in B and M"),
    (((2, 3), (2, 5), (2, 5, 4)), (torch.float32, torch.float32, torch.float64), TypeError, "share a floating dtype"),
])
def test_concatenation_attention_checks_its_arguments(shapes, dtypes, error, match):
    """It checked only the ranks: M = 0 returned NaN (a mean over no keys), mixed dtypes a silent
    promotion, a B or M mismatch PyTorch's bmm error."""
    dtypes = dtypes or (torch.float32,) * 3
    args = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    with pytest.raises(error, match=match):
        concatenation_attention(*args)


def test_dot_product_attention_takes_heads_as_nonlocal_attention_does():
    """4-D [B, heads, rows, dim] operands (refused before, by a message saying 4-D was taken)."""
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 7)
    out = dot_product_attention(q, k, v)
    torch.testing.assert_close(out, (q @ k.transpose(-1, -2) / 6) @ v)
    with pytest.raises(ValueError, match="must agree in \\[B, heads\\]"):
        dot_product_attention(q, k[:, :2], v[:, :2])
