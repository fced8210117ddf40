"""Triton kernels for nonlocal (softmax) attention, forward and backward, flash-attention-2 style.

Installed as ``fastvid.triton_kernels.attention``. The math is ``out = softmax(scale · q kᵀ) v``
row by row, with heads already folded into the batch by the caller:

* ``q`` ``[B, N, D]``, ``k`` ``[B, M, D]``, ``v`` ``[B, M, Dv]`` (any strides; the kernels read them
  through their strides), any head dims ``D, Dv >= 1``, ``N >= 1``, ``M >= 1``;
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

Tiles: ``launch_config`` picks them per kernel from the device's compute capability and shared
memory (``tl.dot`` operands are staged through shared memory: fp32 D = 128 at 64×64 tiles needs
more than an RTX 4090 has), so every dtype fits every GPU from sm_80 on; the launchers pass exactly
its result and tests/test_triton_compile.py compiles exactly that per architecture. A head dim wider
than one tile (``BLOCK_D`` up to MAX_BLOCK_D) is walked in chunks for the score products, and the
output columns are split over grid axis 1, each program recomputing the scores: memory stays linear
for any head dim (Nonlocal I3D's res4 has D = 512).

Numerics: both products go through ``tl.dot`` with operands in the input dtype (P and dS are
rounded to it first, as flash attention does) and fp32 accumulation (fp64 for float64, with
``out_dtype`` passed: Triton before 3.8 does not infer it and fails to compile; fp32
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

__all__ = ["AVAILABLE", "BLOCK_N", "BLOCK_M", "BWD_BLOCK_N", "BWD_BLOCK_M", "MAX_BLOCK_D",
           "KERNELS", "SHARED_MEMORY_LIMITS", "device_limits", "launch_config", "attention_forward",
           "attention_backward"]

# Preferred tile sizes (rows of q per program, rows of k/v per step; powers of two >= 16) and the
# widest head-dim chunk; launch_config shrinks them to fit the device. Module-level so tests can
# shrink them to exercise many blocks, masked tails and chunked head dims on tiny inputs.
BLOCK_N = 64
BLOCK_M = 64
BWD_BLOCK_N = 64
BWD_BLOCK_M = 64
MAX_BLOCK_D = 128
# Most elements (rows × padded head dim) one operand tile may hold before the tile rows are halved
# (bounds the registers a tile needs).
_MAX_TILE_ELEMENTS = 64 * 128
NUM_WARPS = 4
NUM_STAGES = 2

# Shared memory one block may use (the opt-in maximum, bytes) by compute capability: what
# launch_config fits the tiles into when compiling for an arch without the GPU at hand (compile
# tests) and, at sm_89's, under the interpreter. On a GPU the device's own
# shared_memory_per_block_optin is used.
SHARED_MEMORY_LIMITS = {
    (8, 0): 163 * 1024,   # A100
    (8, 6): 99 * 1024,    # RTX 30, A10, A40
    (8, 9): 99 * 1024,    # RTX 40, L4, L40
    (9, 0): 227 * 1024,   # H100, H200
    (10, 0): 227 * 1024,  # B200
}
_INTERPRETER_ARCH = (8, 9)

# The kernels launch_config describes: forward, backward delta, backward dK/dV, backward dQ.
KERNELS = ("fwd", "delta", "dkdv", "dq")


def _pad_dim(n):
    """Head dim padded to the tl.dot tile: the next power of two, at least 16."""
    return max(16, 1 << (int(n) - 1).bit_length()) if n > 1 else 16


def _fit_block(block, width):
    """Halves a tile's row count (not below 16) while rows × padded head width is too large."""
    block = max(16, int(block))
    while block > 16 and block * width > _MAX_TILE_ELEMENTS:
        block //= 2
    return block


def _shared_bytes(kernel, bn, bm, bd, bdv, elem, capability):
    """Upper bound of the shared memory a kernel's tiles take: the tl.dot operands, staged through
    shared memory. Measured on compiled kernels (tests/test_triton_compile.py checks the bound):
    within 1.0x the operand tiles before sm_90 (mma), up to 1.8x from sm_90 on (wgmma / tcgen05
    operands in shared memory, with extra pipeline buffers)."""
    if kernel == "delta":  # no tl.dot: the row-sum reduction's scratch only (<= 1 KB measured)
        return 4096
    if kernel == "fwd":   # q kᵀ then P v
        tiles = bn * bd + bd * bm + bn * bm + bm * bdv
    elif kernel == "dkdv":  # q kᵀ, dO vᵀ, Pᵀ dO, dSᵀ q
        tiles = bn * bd + bd * bm + bn * bdv + bdv * bm + 2 * bm * bn
    else:                 # dq: q kᵀ, dO vᵀ, dS k
        tiles = bn * bd + bd * bm + bn * bdv + bdv * bm + bn * bm
    factor = 2.0 if tuple(capability) >= (9, 0) else 1.25
    return int(factor * elem * tiles)


def launch_config(kernel, dtype, D, Dv, capability, shared_limit, interpret=False):
    """Tile sizes, compile-time flags and launch options of ``kernel`` (one of KERNELS) for head
    dims D, Dv in ``dtype`` on a device of compute ``capability`` ``(major, minor)`` with
    ``shared_limit`` bytes of shared memory per block. The one place launch parameters are chosen:
    the launchers pass exactly this, and the compile tests compile exactly this for each
    architecture. ``interpret``: the Triton interpreter's variant (bf16 rounding and widening by
    hand, see _common.py)."""
    forward = kernel == "fwd"
    bn = BLOCK_N if forward else BWD_BLOCK_N
    bm = BLOCK_M if forward else BWD_BLOCK_M
    bd = min(_pad_dim(D), MAX_BLOCK_D)
    bdv = min(_pad_dim(Dv), MAX_BLOCK_D)
    width = max(bd, bdv)
    bn, bm = _fit_block(bn, width), _fit_block(bm, width)
    elem = torch.empty((), dtype=dtype).element_size()
    # Shrink the widest tile dimension until the tiles fit: head-dim chunks first (down to 32), then
    # rows; every dimension stays >= 16, the smallest tl.dot tile.
    while _shared_bytes(kernel, bn, bm, bd, bdv, elem, capability) > shared_limit:
        if max(bd, bdv) > 32:
            if bd >= bdv:
                bd //= 2
            else:
                bdv //= 2
        elif max(bn, bm) > 16:
            if bn >= bm:
                bn //= 2
            else:
                bm //= 2
        elif max(bd, bdv) > 16:
            bd, bdv = min(bd, 16), min(bdv, 16)
        else:
            raise RuntimeError(f"fastvid triton attention: no {kernel} tiles fit {shared_limit} bytes "
                               f"of shared memory for {dtype}")
    meta = dict(BLOCK_N=bn, BLOCK_DV=bdv, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if kernel != "delta":
        meta.update(BLOCK_M=bm, BLOCK_D=bd, D_FITS=_pad_dim(D) <= bd,
                    FIX_BF16=bool(interpret), WIDEN=bool(interpret) and dtype == torch.bfloat16)
    if kernel in ("dkdv", "dq"):
        meta["DV_FITS"] = _pad_dim(Dv) <= bdv
    return meta


def device_limits(device):
    """(compute capability, shared memory per block in bytes) launch_config sizes tiles for, for
    tensors on ``device``; under the interpreter (CPU tensors), those of sm_86/89."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (props.major, props.minor), props.shared_memory_per_block_optin
    return _INTERPRETER_ARCH, SHARED_MEMORY_LIMITS[_INTERPRETER_ARCH]


if AVAILABLE:
    from torch.library import wrap_triton  # bare name: torch's kernel discovery looks for it

    from . import _common
    from ._common import INTERPRET as _INTERPRET
    from ._common import check_tensor as _check_tensor, register_ops
    from ._common import narrow as _narrow, should_launch as _launch, st as _store

    # ------------------------------------------------------------------------------ helpers
    @triton.jit
    def _mma(a, b, acc, WIDEN: tl.constexpr):
        """acc + a @ b with fp32 products (fp64 for fp64: out_dtype is passed, Triton < 3.8 does not
        infer it); WIDEN: bf16 under the interpreter, whose tl.dot would multiply the raw bf16 bit
        patterns."""
        if WIDEN:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee",
                       out_dtype=acc.dtype)
        else:
            r = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
        return r

    @triton.jit
    def _tile(ptr, rows, row_ok, row_stride, cols, col_ok, col_stride):
        """ptr[rows, cols] as a [len(rows), len(cols)] block, 0 outside the masks."""
        return tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride,
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0)

    @triton.jit
    def _dot_nt(a_ptr, a_rows, a_ok, sa_row, sa_col, b_ptr, b_rows, b_ok, sb_row, sb_col, K, acc,
                WIDEN: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc + A[a_rows, :K] @ B[b_rows, :K]ᵀ with K walked in BLOCK_K chunks: the product of rows
        wider than one tile (head dims past BLOCK_D)."""
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_ok = kk < K
            a = _tile(a_ptr, a_rows, a_ok, sa_row, kk, k_ok, sa_col)
            b_t = _tile(b_ptr, kk, k_ok, sb_col, b_rows, b_ok, sb_row)
            acc = _mma(a, b_t, acc, WIDEN)
        return acc

    @triton.jit
    def _probs_and_dscores(s, dp, lse, delta, tile_ok, scale):
        """A tile's P = exp(scale·s − lse) (0 outside the tensors) and dS = P ∘ (dp − delta), from
        the scores s = q kᵀ and dp = dO vᵀ, recomputed with the saved lse (both backward kernels)."""
        p = tl.where(tile_ok, tl.exp(s * scale - lse[:, None]), 0.0)
        return p, p * (dp - delta[:, None])

    # ------------------------------------------------------------------------------ kernels
    # Head dims: a dim that fits one tile (D_FITS / DV_FITS) is loaded once per program and kept;
    # a wider one is walked in BLOCK_D / BLOCK_DV chunks by _dot_nt, and the output columns are
    # split over grid axis 1 (program_id(1) owns column chunk j of its outputs), each such program
    # recomputing the scores: memory stays linear in N and M for any head dim.
    @triton.jit
    def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, scale_ptr,
                         N, M, D, DV, num_row_blocks,
                         sqb, sqn, sqd, skb, skm, skd, svb, svm, svd,
                         FIX_BF16: tl.constexpr, WIDEN: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D_FITS: tl.constexpr):
        pid = tl.program_id(0)
        j = tl.program_id(1)  # which BLOCK_DV columns of out this program writes
        b = (pid // num_row_blocks).to(tl.int64)
        rows = (pid % num_row_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        d = tl.arange(0, BLOCK_D).to(tl.int64)  # d × stride may pass 2^31 (transposed views)
        d_ok = d < D
        dv = j.to(tl.int64) * BLOCK_DV + tl.arange(0, BLOCK_DV)
        dv_ok = dv < DV
        acc_ty = lse_ptr.dtype.element_ty  # the accumulation dtype (fp32, fp64 for fp64)
        scale = tl.load(scale_ptr)
        q_ptr += b * sqb
        k_ptr += b * skb
        v_ptr += b * svb

        if D_FITS:
            q = _tile(q_ptr, rows, row_ok, sqn, d, d_ok, sqd)
        row_max = tl.full([BLOCK_N], float("-inf"), acc_ty)
        row_sum = tl.zeros([BLOCK_N], acc_ty)
        acc = tl.zeros([BLOCK_N, BLOCK_DV], acc_ty)
        for start in range(0, M, BLOCK_M):
            cols = start + tl.arange(0, BLOCK_M).to(tl.int64)
            col_ok = cols < M
            zeros = tl.zeros([BLOCK_N, BLOCK_M], acc_ty)
            if D_FITS:
                s = _mma(q, _tile(k_ptr, d, d_ok, skd, cols, col_ok, skm), zeros, WIDEN)
            else:
                s = _dot_nt(q_ptr, rows, row_ok, sqn, sqd, k_ptr, cols, col_ok, skm, skd, D, zeros,
                            WIDEN, BLOCK_D)
            # Keys past M get -inf scores (weight 0); every block has at least one real key, so
            # the new row max is finite and exp(-inf - finite) = 0 rescales the empty start.
            s = tl.where(col_ok[None, :], s * scale, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            rescale = tl.exp(row_max - new_max)
            p = tl.exp(s - new_max[:, None])
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            v = _tile(v_ptr, cols, col_ok, svm, dv, dv_ok, svd)  # [BLOCK_M, BLOCK_DV]
            acc = _mma(_narrow(p, v_ptr, FIX_BF16), v, acc * rescale[:, None], WIDEN)
            row_max = new_max
        out = acc / row_sum[:, None]
        # out/lse are contiguous [B, N, DV] / [B, N]; every column chunk has the same lse.
        o_ptrs = o_ptr + (b * N + rows[:, None]) * DV + dv[None, :]
        _store(o_ptrs, out, row_ok[:, None] & dv_ok[None, :], FIX_BF16)
        tl.store(lse_ptr + b * N + rows, row_max + tl.log(row_sum), mask=row_ok & (j == 0))

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
        acc_ty = delta_ptr.dtype.element_ty
        delta = tl.zeros([BLOCK_N], acc_ty)
        for c0 in range(0, DV, BLOCK_DV):
            dv = c0 + tl.arange(0, BLOCK_DV).to(tl.int64)
            dv_ok = dv < DV
            o = _tile(o_ptr + b * sob, rows, row_ok, son, dv, dv_ok, sod)
            do = _tile(do_ptr + b * sdb, rows, row_ok, sdn, dv, dv_ok, sdd)
            delta += tl.sum(o.to(acc_ty) * do.to(acc_ty), axis=1)
        if HAS_GLSE:
            delta -= tl.load(glse_ptr + b * N + rows, mask=row_ok, other=0.0)
        tl.store(delta_ptr + b * N + rows, delta, mask=row_ok)

    @triton.jit
    def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                              scale_ptr, N, M, D, DV, num_col_blocks,
                              sqb, sqn, sqd, skb, skm, skd, svb, svm, svd, sdb, sdn, sdd,
                              FIX_BF16: tl.constexpr, WIDEN: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                              D_FITS: tl.constexpr, DV_FITS: tl.constexpr):
        # One program per (key block, batch) and column chunk j (of dK's and of dV's columns);
        # loops over all query blocks.
        pid = tl.program_id(0)
        j = tl.program_id(1).to(tl.int64)
        b = (pid // num_col_blocks).to(tl.int64)
        cols = (pid % num_col_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        d = tl.arange(0, BLOCK_D).to(tl.int64)  # d × stride may pass 2^31 (transposed views)
        dv = tl.arange(0, BLOCK_DV).to(tl.int64)
        d_ok = d < D
        dv_ok = dv < DV
        dj = j * BLOCK_D + d  # this program's columns of dK / dV (none past D / DV)
        dj_ok = dj < D
        dvj = j * BLOCK_DV + dv
        dvj_ok = dvj < DV
        acc_ty = lse_ptr.dtype.element_ty  # the accumulation dtype (fp32, fp64 for fp64)
        scale = tl.load(scale_ptr)
        q_ptr += b * sqb
        k_ptr += b * skb
        v_ptr += b * svb
        do_ptr += b * sdb

        if D_FITS:
            k_t = _tile(k_ptr, d, d_ok, skd, cols, col_ok, skm)  # [BLOCK_D, BLOCK_M]
        if DV_FITS:
            v_t = _tile(v_ptr, dv, dv_ok, svd, cols, col_ok, svm)  # [BLOCK_DV, BLOCK_M]
        dk = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)
        dv_acc = tl.zeros([BLOCK_M, BLOCK_DV], acc_ty)
        for start in range(0, N, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N).to(tl.int64)
            row_ok = rows < N
            zeros = tl.zeros([BLOCK_N, BLOCK_M], acc_ty)
            # q and dO columns this program accumulates with (the whole rows when they fit).
            q = _tile(q_ptr, rows, row_ok, sqn, dj, dj_ok, sqd)
            do = _tile(do_ptr, rows, row_ok, sdn, dvj, dvj_ok, sdd)
            # With one chunk per operand, j == 0 and chunk j is the whole row.
            if D_FITS:
                if DV_FITS:
                    s = _mma(q, k_t, zeros, WIDEN)
                else:
                    s = _mma(_tile(q_ptr, rows, row_ok, sqn, d, d_ok, sqd), k_t, zeros, WIDEN)
            else:
                s = _dot_nt(q_ptr, rows, row_ok, sqn, sqd, k_ptr, cols, col_ok, skm, skd, D, zeros,
                            WIDEN, BLOCK_D)
            if DV_FITS:
                if D_FITS:
                    dp = _mma(do, v_t, zeros, WIDEN)
                else:
                    dp = _mma(_tile(do_ptr, rows, row_ok, sdn, dv, dv_ok, sdd), v_t, zeros, WIDEN)
            else:
                dp = _dot_nt(do_ptr, rows, row_ok, sdn, sdd, v_ptr, cols, col_ok, svm, svd, DV,
                             zeros, WIDEN, BLOCK_DV)
            lse = tl.load(lse_ptr + b * N + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + b * N + rows, mask=row_ok, other=0.0)
            p, ds = _probs_and_dscores(s, dp, lse, delta, row_ok[:, None] & col_ok[None, :], scale)
            dv_acc = _mma(tl.trans(_narrow(p, do_ptr, FIX_BF16)), do, dv_acc, WIDEN)
            dk = _mma(tl.trans(_narrow(ds, q_ptr, FIX_BF16)), q, dk, WIDEN)
        dk = dk * scale
        # dk/dv are contiguous [B, M, D] / [B, M, DV].
        _store(dk_ptr + (b * M + cols[:, None]) * D + dj[None, :], dk,
               col_ok[:, None] & dj_ok[None, :], FIX_BF16)
        _store(dv_ptr + (b * M + cols[:, None]) * DV + dvj[None, :], dv_acc,
               col_ok[:, None] & dvj_ok[None, :], FIX_BF16)

    @triton.jit
    def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                            scale_ptr, N, M, D, DV, num_row_blocks,
                            sqb, sqn, sqd, skb, skm, skd, svb, svm, svd, sdb, sdn, sdd,
                            FIX_BF16: tl.constexpr, WIDEN: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                            D_FITS: tl.constexpr, DV_FITS: tl.constexpr):
        # One program per (query block, batch) and column chunk j of dQ; loops over all key blocks.
        pid = tl.program_id(0)
        j = tl.program_id(1).to(tl.int64)
        b = (pid // num_row_blocks).to(tl.int64)
        rows = (pid % num_row_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        d = tl.arange(0, BLOCK_D).to(tl.int64)  # d × stride may pass 2^31 (transposed views)
        dv = tl.arange(0, BLOCK_DV).to(tl.int64)
        d_ok = d < D
        dv_ok = dv < DV
        dj = j * BLOCK_D + d  # this program's columns of dQ
        dj_ok = dj < D
        acc_ty = lse_ptr.dtype.element_ty  # the accumulation dtype (fp32, fp64 for fp64)
        scale = tl.load(scale_ptr)
        q_ptr += b * sqb
        k_ptr += b * skb
        v_ptr += b * svb
        do_ptr += b * sdb

        if D_FITS:
            q = _tile(q_ptr, rows, row_ok, sqn, d, d_ok, sqd)
        if DV_FITS:
            do = _tile(do_ptr, rows, row_ok, sdn, dv, dv_ok, sdd)
        lse = tl.load(lse_ptr + b * N + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + b * N + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
        for start in range(0, M, BLOCK_M):
            cols = start + tl.arange(0, BLOCK_M).to(tl.int64)
            col_ok = cols < M
            zeros = tl.zeros([BLOCK_N, BLOCK_M], acc_ty)
            k = _tile(k_ptr, cols, col_ok, skm, dj, dj_ok, skd)  # [BLOCK_M, BLOCK_D], chunk j
            if D_FITS:
                s = _mma(q, tl.trans(k), zeros, WIDEN)
            else:
                s = _dot_nt(q_ptr, rows, row_ok, sqn, sqd, k_ptr, cols, col_ok, skm, skd, D, zeros,
                            WIDEN, BLOCK_D)
            if DV_FITS:
                dp = _mma(do, _tile(v_ptr, dv, dv_ok, svd, cols, col_ok, svm), zeros, WIDEN)
            else:
                dp = _dot_nt(do_ptr, rows, row_ok, sdn, sdd, v_ptr, cols, col_ok, svm, svd, DV,
                             zeros, WIDEN, BLOCK_DV)
            _, ds = _probs_and_dscores(s, dp, lse, delta, row_ok[:, None] & col_ok[None, :], scale)
            dq = _mma(_narrow(ds, k_ptr, FIX_BF16), k, dq, WIDEN)
        dq = dq * scale
        _store(dq_ptr + (b * N + rows[:, None]) * D + dj[None, :], dq,
               row_ok[:, None] & dj_ok[None, :], FIX_BF16)

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

    def _strides(t):
        return tuple(t.stride())

    def _configs(q, D, Dv, kernels):
        capability, limit = device_limits(q.device)
        return [launch_config(name, q.dtype, D, Dv, capability, limit, _INTERPRET) for name in kernels]

    # ------------------------------------------------------------------------------ op bodies
    def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        fn = "triton_nonlocal_attention"
        B, N, M, D, Dv = _check_qkv(fn, q, k, v)
        out = torch.empty((B, N, Dv), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, N), dtype=_acc_dtype(q.dtype), device=q.device)
        if _launch(B * N, q):
            (meta,) = _configs(q, D, Dv, ("fwd",))
            row_blocks = triton.cdiv(N, meta["BLOCK_N"])
            grid = (B * row_blocks, triton.cdiv(Dv, meta["BLOCK_DV"]))
            with _common.device_guard(q):
                wrap_triton(_attn_fwd_kernel)[grid](
                    q, k, v, out, lse, _scale_tensor(scale, q.dtype, q.device),
                    N, M, D, Dv, row_blocks, *_strides(q), *_strides(k), *_strides(v), **meta)
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
        scale_t = _scale_tensor(scale, q.dtype, q.device)
        delta_meta, dkdv_meta, dq_meta = _configs(q, D, Dv, ("delta", "dkdv", "dq"))
        delta = torch.empty((B, N), dtype=acc, device=q.device)
        common = (N, M, D, Dv)
        strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
        with _common.device_guard(q):
            row_blocks = triton.cdiv(N, delta_meta["BLOCK_N"])
            wrap_triton(_attn_bwd_delta_kernel)[(B * row_blocks,)](
                out, grad_out, grad_lse if grad_lse is not None else lse, delta, N, Dv, row_blocks,
                *_strides(out), *_strides(grad_out), HAS_GLSE=grad_lse is not None, **delta_meta)
            col_blocks = triton.cdiv(M, dkdv_meta["BLOCK_M"])
            chunks = max(triton.cdiv(D, dkdv_meta["BLOCK_D"]), triton.cdiv(Dv, dkdv_meta["BLOCK_DV"]))
            wrap_triton(_attn_bwd_dkdv_kernel)[(B * col_blocks, chunks)](
                q, k, v, grad_out, lse, delta, dk, dv, scale_t, *common, col_blocks, *strides,
                **dkdv_meta)
            row_blocks = triton.cdiv(N, dq_meta["BLOCK_N"])
            wrap_triton(_attn_bwd_dq_kernel)[(B * row_blocks, triton.cdiv(D, dq_meta["BLOCK_D"]))](
                q, k, v, grad_out, lse, delta, dq, scale_t, *common, row_blocks, *strides, **dq_meta)
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
