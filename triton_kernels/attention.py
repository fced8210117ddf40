"""Triton kernels for nonlocal (softmax) attention, forward and backward, flash-attention-2 style.

Installed as ``fastvid.triton_kernels.attention``. The math is ``out = softmax(scale · q kᵀ) v``
row by row, with heads already folded into the batch by the caller:

* ``q`` ``[B, N, D]``, ``k`` ``[B, M, D]``, ``v`` ``[B, M, Dv]`` (any strides; the kernels read them
  through their strides), ``D, Dv <= 256``, ``N >= 1``, ``M >= 1``;
* ``out`` ``[B, N, Dv]`` contiguous in q's dtype, ``lse`` ``[B, N]`` the per-row log-sum-exp of
  ``scale · q kᵀ`` in the accumulation dtype (float32, float64 for float64 inputs).

The N×M affinity matrix is never stored: it is rebuilt tile by tile in registers.

* forward: one program per (query block, batch) walks the key blocks with an online softmax
  (running row max ``m``, running sum ``l``, accumulator rescaled by ``exp(m_old - m_new)``);
  the output is written once, ``lse = m + log(l)`` is saved for the backward;
* backward: ``delta_i = Σ_j dO_ij O_ij - grad_lse_i`` (a small kernel), then one kernel per key
  block accumulating ``dK``, ``dV`` over all query blocks and one per query block accumulating
  ``dQ`` over all key blocks, both recomputing ``P = exp(scale · q kᵀ - lse)``; with
  ``dS = P ∘ (dO vᵀ - delta)``: ``dV = Pᵀ dO``, ``dK = scale · dSᵀ q``, ``dQ = scale · dS k``.
  Each output tile has exactly one writer: deterministic, no atomics.

Numerics: both products go through ``tl.dot`` with operands in the input dtype (P and dS are
rounded to it first, as flash attention does) and fp32 accumulation (fp64 for float64; fp32
products use ``input_precision="ieee"``, not TF32, so fp32 results match an fp32 reference); the
softmax statistics are kept in the accumulation dtype. ``scale`` reaches the kernels through a
one-element tensor of the accumulation dtype, since Triton passes Python floats as fp32, which
would cost float64 inputs their precision. Head dims are padded to the next power of two (at least
16, the smallest ``tl.dot`` tile) and masked; N and M need not be multiples of the tiles; offsets
are 64-bit.

Ops (``mutates_args=()``):

* ``fastvid::triton_nonlocal_attention(q, k, v, scale) -> (out, lse)`` with autograd (gradients
  of both outputs; either may be None);
* ``fastvid::triton_nonlocal_attention_backward(grad_out, grad_lse?, q, k, v, out, lse, scale)
  -> (dq, dk, dv)``; no double backward.

Without Triton the module still imports, with ``AVAILABLE = False`` and none of the above defined.
Interpreter notes (fake tensors skip the launch; ops stay opaque under functionalization; bf16
stores round by hand) are in ``_common.py``; in addition, the interpreter multiplies bf16 blocks as
their raw bit patterns, so there bf16 operands are widened to fp32 right before ``tl.dot`` (exact:
a bf16 × bf16 product fits in fp32, the same as the tensor cores compute).
"""
from typing import Optional, Tuple

import torch

from ._common import AVAILABLE, tl, triton

__all__ = ["AVAILABLE", "BLOCK_N", "BLOCK_M", "BWD_BLOCK_N", "BWD_BLOCK_M", "MAX_HEAD_DIM",
           "attention_forward", "attention_backward"]

# Tile sizes (rows of q per program, rows of k/v per step; powers of two >= 16). Module-level so
# tests can shrink them to exercise many blocks and masked tails. Wide head dims halve them (see
# _fit_block) to bound the registers a tile needs.
BLOCK_N = 64
BLOCK_M = 64
BWD_BLOCK_N = 64
BWD_BLOCK_M = 64
MAX_HEAD_DIM = 256
# Most elements (rows × padded head dim) one operand tile may hold before the tile rows are halved.
_MAX_TILE_ELEMENTS = 64 * 128


def _pad_dim(n):
    """Head dim padded to the tl.dot tile: the next power of two, at least 16."""
    return max(16, 1 << (int(n) - 1).bit_length()) if n > 1 else 16


def _fit_block(block, width):
    """Halves a tile's row count (not below 16) while rows × padded head width is too large."""
    block = max(16, int(block))
    while block > 16 and block * width > _MAX_TILE_ELEMENTS:
        block //= 2
    return block


if AVAILABLE:
    from torch.library import wrap_triton  # bare name: torch's kernel discovery looks for it

    from ._common import FIX_BF16 as _FIX_BF16
    from ._common import INTERPRET as _INTERPRET
    from ._common import check_tensor as _check_tensor, register_ops
    from ._common import narrow as _narrow, should_launch as _launch, st as _store

    # ------------------------------------------------------------------------------ helpers
    @triton.jit
    def _mma(a, b, acc, WIDEN: tl.constexpr):
        """acc + a @ b with fp32 products (fp64 for fp64); WIDEN: bf16 under the interpreter,
        whose tl.dot would multiply the raw bf16 bit patterns."""
        if WIDEN:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            r = tl.dot(a, b, acc, input_precision="ieee")
        return r

    # ------------------------------------------------------------------------------ kernels
    @triton.jit
    def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, scale_ptr,
                         N, M, D, DV, num_row_blocks,
                         sqb, sqn, sqd, skb, skm, skd, svb, svm, svd,
                         FIX_BF16: tl.constexpr, WIDEN: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        pid = tl.program_id(0)
        b = (pid // num_row_blocks).to(tl.int64)
        rows = (pid % num_row_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        d = tl.arange(0, BLOCK_D).to(tl.int64)  # d × stride may pass 2^31 (transposed views)
        dv = tl.arange(0, BLOCK_DV).to(tl.int64)
        d_ok = d < D
        dv_ok = dv < DV
        acc_ty = lse_ptr.dtype.element_ty  # the accumulation dtype (fp32, fp64 for fp64)
        scale = tl.load(scale_ptr)

        q = tl.load(q_ptr + b * sqb + rows[:, None] * sqn + d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        row_max = tl.full([BLOCK_N], float("-inf"), acc_ty)
        row_sum = tl.zeros([BLOCK_N], acc_ty)
        acc = tl.zeros([BLOCK_N, BLOCK_DV], acc_ty)
        for start in range(0, M, BLOCK_M):
            cols = start + tl.arange(0, BLOCK_M).to(tl.int64)
            col_ok = cols < M
            k_t = tl.load(k_ptr + b * skb + cols[None, :] * skm + d[:, None] * skd,
                          mask=d_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_M]
            s = _mma(q, k_t, tl.zeros([BLOCK_N, BLOCK_M], acc_ty), WIDEN) * scale
            # Keys past M get -inf scores (weight 0); every block has at least one real key, so
            # the new row max is finite and exp(-inf - finite) = 0 rescales the empty start.
            s = tl.where(col_ok[None, :], s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            rescale = tl.exp(row_max - new_max)
            p = tl.exp(s - new_max[:, None])
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            v = tl.load(v_ptr + b * svb + cols[:, None] * svm + dv[None, :] * svd,
                        mask=col_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_DV]
            acc = _mma(_narrow(p, v_ptr, FIX_BF16), v, acc * rescale[:, None], WIDEN)
            row_max = new_max
        out = acc / row_sum[:, None]
        # out/lse are contiguous [B, N, DV] / [B, N].
        o_ptrs = o_ptr + (b * N + rows[:, None]) * DV + dv[None, :]
        _store(o_ptrs, out, row_ok[:, None] & dv_ok[None, :], FIX_BF16)
        tl.store(lse_ptr + b * N + rows, row_max + tl.log(row_sum), mask=row_ok)

    @triton.jit
    def _attn_bwd_delta_kernel(o_ptr, do_ptr, glse_ptr, delta_ptr, N, DV, num_row_blocks,
                               sob, son, sod, sdb, sdn, sdd,
                               HAS_GLSE: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr):
        # delta[b, i] = Σ_c dO[b, i, c] O[b, i, c] - grad_lse[b, i]  (grad_lse/delta contiguous).
        pid = tl.program_id(0)
        b = (pid // num_row_blocks).to(tl.int64)
        rows = (pid % num_row_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        dv = tl.arange(0, BLOCK_DV).to(tl.int64)
        mask = row_ok[:, None] & (dv < DV)[None, :]
        o = tl.load(o_ptr + b * sob + rows[:, None] * son + dv[None, :] * sod, mask=mask, other=0.0)
        do = tl.load(do_ptr + b * sdb + rows[:, None] * sdn + dv[None, :] * sdd, mask=mask, other=0.0)
        acc_ty = delta_ptr.dtype.element_ty
        delta = tl.sum(o.to(acc_ty) * do.to(acc_ty), axis=1)
        if HAS_GLSE:
            delta -= tl.load(glse_ptr + b * N + rows, mask=row_ok, other=0.0)
        tl.store(delta_ptr + b * N + rows, delta, mask=row_ok)

    @triton.jit
    def _probs_and_dscores(q, k_t, do, v_t, lse, delta, tile_ok, scale, WIDEN: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """One tile's P = exp(scale·q kᵀ − lse) (0 outside the tensors) and dS = P ∘ (dO vᵀ − delta),
        recomputed from the saved lse (both backward kernels)."""
        zeros = tl.zeros([BLOCK_N, BLOCK_M], lse.dtype)
        p = tl.exp(_mma(q, k_t, zeros, WIDEN) * scale - lse[:, None])
        p = tl.where(tile_ok, p, 0.0)
        ds = p * (_mma(do, v_t, zeros, WIDEN) - delta[:, None])
        return p, ds

    @triton.jit
    def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                              scale_ptr, N, M, D, DV, num_col_blocks,
                              sqb, sqn, sqd, skb, skm, skd, svb, svm, svd, sdb, sdn, sdd,
                              FIX_BF16: tl.constexpr, WIDEN: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        # One program per (key block, batch); loops over all query blocks.
        pid = tl.program_id(0)
        b = (pid // num_col_blocks).to(tl.int64)
        cols = (pid % num_col_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        d = tl.arange(0, BLOCK_D).to(tl.int64)  # d × stride may pass 2^31 (transposed views)
        dv = tl.arange(0, BLOCK_DV).to(tl.int64)
        d_ok = d < D
        dv_ok = dv < DV
        acc_ty = lse_ptr.dtype.element_ty  # the accumulation dtype (fp32, fp64 for fp64)
        scale = tl.load(scale_ptr)

        k = tl.load(k_ptr + b * skb + cols[:, None] * skm + d[None, :] * skd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        v = tl.load(v_ptr + b * svb + cols[:, None] * svm + dv[None, :] * svd,
                    mask=col_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_DV]
        k_t = tl.trans(k)
        v_t = tl.trans(v)
        dk = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)
        dv_acc = tl.zeros([BLOCK_M, BLOCK_DV], acc_ty)
        for start in range(0, N, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N).to(tl.int64)
            row_ok = rows < N
            q = tl.load(q_ptr + b * sqb + rows[:, None] * sqn + d[None, :] * sqd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_ptr + b * sdb + rows[:, None] * sdn + dv[None, :] * sdd,
                         mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
            lse = tl.load(lse_ptr + b * N + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + b * N + rows, mask=row_ok, other=0.0)
            p, ds = _probs_and_dscores(q, k_t, do, v_t, lse, delta, row_ok[:, None] & col_ok[None, :], scale,
                                       WIDEN, BLOCK_N, BLOCK_M)
            dv_acc = _mma(tl.trans(_narrow(p, do_ptr, FIX_BF16)), do, dv_acc, WIDEN)
            dk = _mma(tl.trans(_narrow(ds, q_ptr, FIX_BF16)), q, dk, WIDEN)
        dk = dk * scale
        # dk/dv are contiguous [B, M, D] / [B, M, DV].
        _store(dk_ptr + (b * M + cols[:, None]) * D + d[None, :], dk,
               col_ok[:, None] & d_ok[None, :], FIX_BF16)
        _store(dv_ptr + (b * M + cols[:, None]) * DV + dv[None, :], dv_acc,
               col_ok[:, None] & dv_ok[None, :], FIX_BF16)

    @triton.jit
    def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                            scale_ptr, N, M, D, DV, num_row_blocks,
                            sqb, sqn, sqd, skb, skm, skd, svb, svm, svd, sdb, sdn, sdd,
                            FIX_BF16: tl.constexpr, WIDEN: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        # One program per (query block, batch); loops over all key blocks.
        pid = tl.program_id(0)
        b = (pid // num_row_blocks).to(tl.int64)
        rows = (pid % num_row_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        d = tl.arange(0, BLOCK_D).to(tl.int64)  # d × stride may pass 2^31 (transposed views)
        dv = tl.arange(0, BLOCK_DV).to(tl.int64)
        d_ok = d < D
        dv_ok = dv < DV
        acc_ty = lse_ptr.dtype.element_ty  # the accumulation dtype (fp32, fp64 for fp64)
        scale = tl.load(scale_ptr)

        q = tl.load(q_ptr + b * sqb + rows[:, None] * sqn + d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_ptr + b * sdb + rows[:, None] * sdn + dv[None, :] * sdd,
                     mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + b * N + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + b * N + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
        for start in range(0, M, BLOCK_M):
            cols = start + tl.arange(0, BLOCK_M).to(tl.int64)
            col_ok = cols < M
            k = tl.load(k_ptr + b * skb + cols[:, None] * skm + d[None, :] * skd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
            v_t = tl.load(v_ptr + b * svb + cols[None, :] * svm + dv[:, None] * svd,
                          mask=dv_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_DV, BLOCK_M]
            _, ds = _probs_and_dscores(q, tl.trans(k), do, v_t, lse, delta, row_ok[:, None] & col_ok[None, :], scale,
                                       WIDEN, BLOCK_N, BLOCK_M)
            dq = _mma(_narrow(ds, k_ptr, FIX_BF16), k, dq, WIDEN)
        dq = dq * scale
        _store(dq_ptr + (b * N + rows[:, None]) * D + d[None, :], dq,
               row_ok[:, None] & d_ok[None, :], FIX_BF16)

    # ------------------------------------------------------------------------------ validation
    def _acc_dtype(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    def _check_qkv(fn, q, k, v):
        """Validates q [B, N, D], k [B, M, D], v [B, M, Dv]; returns (B, N, M, D, Dv)."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_tensor(fn, name, t, 3)
        for name, t in (("k", k), ("v", v)):
            if t.device != q.device:
                raise ValueError(f"{fn}: {name} is on device {t.device} but q is on device {q.device}")
            if t.dtype != q.dtype:
                raise TypeError(f"{fn}: {name} dtype {t.dtype} differs from q dtype {q.dtype}")
        (B, N, D), (Bk, M, Dk), (Bv, Mv, Dv) = q.shape, k.shape, v.shape
        if Bk != B or Bv != B:
            raise ValueError(f"{fn}: q, k, v must share the batch size B, got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}, v {tuple(v.shape)}")
        if Dk != D:
            raise ValueError(f"{fn}: k must be [B, M, D] with q's head dim D = {D}, got k "
                             f"{tuple(k.shape)} for q {tuple(q.shape)}")
        if Mv != M:
            raise ValueError(f"{fn}: v must be [B, M, Dv] with k's key count M = {M}, got v "
                             f"{tuple(v.shape)} for k {tuple(k.shape)}")
        if N == 0:
            raise ValueError(f"{fn}: q has no query rows (N = 0), shape {tuple(q.shape)}")
        if M == 0:
            raise ValueError(f"{fn}: k and v have no keys (M = 0): softmax over an empty set")
        if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
            raise ValueError(f"{fn}: head dims must be <= {MAX_HEAD_DIM}, got D = {D}, Dv = {Dv}")
        return B, N, M, D, Dv

    def _check_like(fn, name, t, shape, device, dtype=None):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape) or t.device != device:
            raise ValueError(f"{fn}: {name} must have shape {tuple(shape)} on {device}, got "
                             f"{tuple(t.shape)} on {t.device}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")

    def _scale_tensor(scale, dtype, device):
        """scale as a one-element accumulation-dtype tensor (see the module docstring)."""
        return torch.full((1,), float(scale), dtype=_acc_dtype(dtype), device=device)

    def _tiles(block_rows, block_cols, D, Dv):
        BD, BDV = _pad_dim(D), _pad_dim(Dv)
        width = max(BD, BDV)
        return _fit_block(block_rows, width), _fit_block(block_cols, width), BD, BDV

    def _strides(t):
        return tuple(t.stride())

    # ------------------------------------------------------------------------------ op bodies
    def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        fn = "triton_nonlocal_attention"
        B, N, M, D, Dv = _check_qkv(fn, q, k, v)
        out = torch.empty((B, N, Dv), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, N), dtype=_acc_dtype(q.dtype), device=q.device)
        if _launch(B * N, q):
            bn, bm, bd, bdv = _tiles(BLOCK_N, BLOCK_M, D, Dv)
            row_blocks = triton.cdiv(N, bn)
            wrap_triton(_attn_fwd_kernel)[(B * row_blocks,)](
                q, k, v, out, lse, _scale_tensor(scale, q.dtype, q.device),
                N, M, D, Dv, row_blocks, *_strides(q), *_strides(k), *_strides(v),
                FIX_BF16=_FIX_BF16,
                WIDEN=_INTERPRET and q.dtype == torch.bfloat16,
                BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, BLOCK_DV=bdv)
        return out, lse

    def _bwd_impl(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "triton_nonlocal_attention_backward"
        B, N, M, D, Dv = _check_qkv(fn, q, k, v)
        _check_like(fn, "grad_out", grad_out, (B, N, Dv), q.device)
        _check_like(fn, "out", out, (B, N, Dv), q.device)
        _check_like(fn, "lse", lse, (B, N), q.device)
        if grad_lse is not None:
            _check_like(fn, "grad_lse", grad_lse, (B, N), q.device)
        acc = _acc_dtype(q.dtype)
        # The products take operands of one dtype: dO in q's; lse/grad_lse are read contiguously.
        grad_out = grad_out.to(q.dtype)
        out = out.to(q.dtype)
        lse = lse.to(acc).contiguous()
        if grad_lse is not None:
            grad_lse = grad_lse.to(acc).contiguous()
        dq = torch.empty((B, N, D), dtype=q.dtype, device=q.device)
        dk = torch.empty((B, M, D), dtype=q.dtype, device=q.device)
        dv = torch.empty((B, M, Dv), dtype=q.dtype, device=q.device)
        if not _launch(B * N, q):
            return dq, dk, dv
        widen = _INTERPRET and q.dtype == torch.bfloat16
        scale_t = _scale_tensor(scale, q.dtype, q.device)
        bn, bm, bd, bdv = _tiles(BWD_BLOCK_N, BWD_BLOCK_M, D, Dv)
        row_blocks, col_blocks = triton.cdiv(N, bn), triton.cdiv(M, bm)

        delta = torch.empty((B, N), dtype=acc, device=q.device)
        wrap_triton(_attn_bwd_delta_kernel)[(B * row_blocks,)](
            out, grad_out, grad_lse if grad_lse is not None else lse, delta, N, Dv, row_blocks,
            *_strides(out), *_strides(grad_out), HAS_GLSE=grad_lse is not None,
            BLOCK_N=bn, BLOCK_DV=bdv)
        common = (N, M, D, Dv)
        strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
        meta = dict(FIX_BF16=_FIX_BF16, WIDEN=widen, BLOCK_N=bn, BLOCK_M=bm,
                    BLOCK_D=bd, BLOCK_DV=bdv)
        wrap_triton(_attn_bwd_dkdv_kernel)[(B * col_blocks,)](
            q, k, v, grad_out, lse, delta, dk, dv, scale_t, *common, col_blocks, *strides, **meta)
        wrap_triton(_attn_bwd_dq_kernel)[(B * row_blocks,)](
            q, k, v, grad_out, lse, delta, dq, scale_t, *common, row_blocks, *strides, **meta)
        return dq, dk, dv

    # ------------------------------------------------------------------------------ autograd
    def _setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale

    def _autograd_backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None and grad_lse is None:
            return None, None, None, None
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = torch.ops.fastvid.triton_nonlocal_attention_backward(
            grad_out, grad_lse, q, k, v, out, lse, ctx.scale)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None)

    def _setup_none(ctx, inputs, output):
        pass

    # ------------------------------------------------------------------------------ registration
    register_ops((("triton_nonlocal_attention", _fwd_impl, _autograd_backward, _setup_context),
                  ("triton_nonlocal_attention_backward", _bwd_impl, None, _setup_none)))

    # ------------------------------------------------------------------------------ public API
    def attention_forward(q, k, v, scale):
        """``(out, lse)``: ``out [B, N, Dv] = softmax(scale · q kᵀ) v`` in q's dtype and
        ``lse [B, N]`` = log-sum-exp of ``scale · q kᵀ`` per row (float32; float64 for float64).
        Differentiable in q, k, v through both outputs."""
        return torch.ops.fastvid.triton_nonlocal_attention(q, k, v, float(scale))

    def attention_backward(grad_out, grad_lse, q, k, v, out, lse, scale):
        """``(dq, dk, dv)`` from the gradients of ``out`` and (optionally, else None) ``lse``."""
        return torch.ops.fastvid.triton_nonlocal_attention_backward(
            grad_out, grad_lse, q, k, v, out, lse, float(scale))
