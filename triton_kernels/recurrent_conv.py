"""Triton ConvLSTM / ConvGRU sequences: the hidden convolution and the cell fused, one launch per step.

Installed as ``fastvid.triton_kernels.recurrent_conv``. Math, gate orders and dtypes are those of
``fastvid/reference/recurrent.py`` (the oracle).

A sequence runs as
* the input convolution of all frames at once (native ``conv2d`` over ``B*T`` frames, bias
  included: ``x_gates [B, T, G*C, H, W]``), outside the op so autograd differentiates it natively;
* per step, ONE launch of ``_conv_cell_step_kernel`` (two for the Ballas GRU, below): the hidden
  convolution of ``h_{t-1}`` as an implicit GEMM (``tl.dot``; M = pixels of ``B*H*W``, N = a tile of hidden channels taken in all G
  gates at once, K = taps × input channels) whose epilogue adds ``x_gates_t`` (and ``b_hh`` for the
  GRU) and applies the cell, so the pre-activations never reach memory. It writes ``h_t`` into the
  output frame, ``c_t`` (LSTM) and, when training, the backward cache the Triton cell backward
  reads: the activated gates i, f, g, o (LSTM) or r, z, n, h_n (GRU), ``[B, 4C, H, W]``.
* backward per step (reverse time): the Triton cell backward op, then the input-gradient
  convolution of the gate gradients (native), and one weight-gradient convolution batched over all
  steps.

Supported: LSTM with or without peephole, GRU with ``reset_after=True`` (nn.GRU) in one launch per
step, and the Ballas GRU (``reset_after=False``) in two: its n convolution reads ``r ⊙ h_{t-1}``, which
needs r, i.e. the r convolution, first (launch 1: the r, z convolution and ``reset_h = r ⊙ h_{t-1}``;
launch 2: the n convolution of reset_h and the cell).

Tiles: ``launch_config`` picks them from the device's shared memory (``attention.device_limits`` /
``SHARED_MEMORY_LIMITS``, the one table); tests/test_triton_compile.py compiles exactly its choice.
Numerics: ``tl.dot`` with operands in the input dtype and fp32 accumulation (fp64 for fp64, with
``out_dtype``), ``input_precision="ieee"`` (no TF32): fp32 sequences match an fp32 reference.
Offsets are 64-bit.

``lengths`` (optional int64 ``[B]``): sample b is valid at time index t iff ``t < lengths[b]`` (t is
the frame index, in either direction); at an invalid step the output frame is 0 and h, c are kept.
Forward only here: a backward through a call with ``lengths`` raises.

Ops (``mutates_args=()``; forward ops with autograd, backward ops refuse double backward):

* ``fastvid::triton_convlstm_hidden(x_gates, weight_hh, h0, c0, peephole?, lengths?, padding,
  dilation, reverse, save) -> (output, h_n, c_n, gates, cells)``
* ``fastvid::triton_convlstm_hidden_backward(grad_output?, grad_h_n?, grad_c_n?, weight_hh, h0, c0,
  peephole?, output, gates, cells, padding, dilation, reverse)
  -> (grad_x_gates, grad_weight_hh, grad_h0, grad_c0, grad_peephole)``
* ``fastvid::triton_convgru_hidden(x_gates, weight_hh, bias_hh?, h0, lengths?, padding, dilation,
  reset_after, reverse, save) -> (output, h_n, cache, resets)``
* ``fastvid::triton_convgru_hidden_backward(grad_output?, grad_h_n?, weight_hh, h0, output, cache,
  resets, padding, dilation, reset_after, reverse) -> (grad_x_gates, grad_weight_hh, grad_bias_hh,
  grad_h0)``

Caches (``gates``, ``cells``, ``cache``, and ``resets``: the Ballas GRU's reset_h per step, the operand
of its n weight gradient) are time-major ``[T, B, *, H, W]``, contiguous, so the cell backward reads
each step without a copy. Without Triton: ``AVAILABLE = False``, nothing defined.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastvid.reference.recurrent import compute_dtype

from ._common import AVAILABLE, tl, triton

__all__ = ["AVAILABLE", "BLOCK_M", "BLOCK_C", "BLOCK_K", "launch_config", "convlstm", "convgru",
           "convlstm_hidden", "convgru_hidden"]

# Preferred tiles (powers of two >= 16, the smallest tl.dot tile): pixels per program, hidden
# channels per program (times G gates), input channels per tl.dot step. launch_config shrinks them
# to fit the device; module-level so tests can shrink them to exercise many programs and K chunks.
BLOCK_M = 64
BLOCK_C = 32
BLOCK_K = 32
NUM_WARPS = 4
NUM_STAGES = 2


def _pad(n):
    """Channel count padded to a tl.dot tile: the next power of two, at least 16."""
    return max(16, 1 << (int(n) - 1).bit_length())


def _shared_bytes(gates, bm, bc, bk, elem, stages, capability):
    """Upper bound of the shared memory of one program: the A tile [bm, bk] and G weight tiles
    [bk, bc] staged per pipeline stage, with the attention kernels' measured margin (x1.25 before
    sm_90, x2 from sm_90 on: wgmma operand buffers)."""
    factor = 2.0 if tuple(capability) >= (9, 0) else 1.25
    return int(factor * elem * stages * (bm * bk + gates * bk * bc))


def launch_config(cell, dtype, C, capability, shared_limit, interpret=False):
    """Tiles, flags and launch options of the fused step kernel for ``cell`` ('lstm' | 'gru') with C
    hidden channels in ``dtype`` on a device of ``capability`` with ``shared_limit`` bytes of shared
    memory per block. The one place launch parameters are chosen (the compile test compiles it)."""
    gates = 4 if cell == "lstm" else 3
    elem = torch.empty((), dtype=dtype).element_size()
    bm = min(BLOCK_M, 32) if dtype == torch.float64 else BLOCK_M  # fp64 accumulators: registers
    bc = min(_pad(C), BLOCK_C)
    bk = min(_pad(C), BLOCK_K)
    while _shared_bytes(gates, bm, bc, bk, elem, NUM_STAGES, capability) > shared_limit:
        if bk > 16:
            bk //= 2
        elif bc > 16:
            bc //= 2
        elif bm > 16:
            bm //= 2
        else:
            raise RuntimeError(f"fastvid triton convolution: no tiles fit {shared_limit} bytes of shared "
                               f"memory for {dtype}")
    return dict(BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=bk, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                FIX_BF16=bool(interpret), WIDEN=bool(interpret) and dtype == torch.bfloat16)


if AVAILABLE:
    from torch.library import wrap_triton  # bare name: torch's kernel discovery looks for it

    from . import _common
    from . import attention as _attention
    from ._common import INTERPRET as _INTERPRET
    from ._common import check_tensor, ld as _ld, register_ops, should_launch as _launch, st as _st
    from .attention import _mma
    from .recurrent import _sigmoid, _tanh

    # ------------------------------------------------------------------------------ kernels
    @triton.jit
    def _tile(M, C, W, HW, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's pixels m = (b, p = y*W + x) of the M = B*H*W and hidden channels n, int64."""
        m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        b = m // HW
        p = m - b * HW
        y = p // W
        n = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        return m < M, b, p, y, p - y * W, n, n < C

    @triton.jit
    def _hidden_gemm(h_ptr, w_ptr, b, y, x, m_ok, n, n_ok, C, H, W, s_hb, s_hc, s_hy, s_hx,
                     NG: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr,
                     DW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, IS64: tl.constexpr,
                     WIDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """The hidden convolution of this tile as an implicit GEMM: acc_g[m, n] = Σ over taps and input
        channels cin of h[b, cin, y + ky*DH - PH, x + kx*DW - PW] · w[tap*C + cin, g*C + n], for the NG
        (<= 4) gates of the weight matrix w [KH*KW*C, NG*C]; accumulators past NG stay 0."""
        if IS64:
            acc0 = tl.zeros([BLOCK_M, BLOCK_C], tl.float64)
        else:
            acc0 = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        acc1 = tl.zeros_like(acc0)
        acc2 = tl.zeros_like(acc0)
        acc3 = tl.zeros_like(acc0)
        w_rows0 = tl.arange(0, BLOCK_K).to(tl.int64)  # rows of this tap's first chunk
        for tap in range(KH * KW):
            ky = tap // KW
            kx = tap - ky * KW
            iy = y + (ky * DH - PH)
            ix = x + (kx * DW - PW)
            pix_ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            a_row = b * s_hb + iy * s_hy + ix * s_hx
            for k0 in range(0, C, BLOCK_K):
                cin = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                k_ok = cin < C
                a = tl.load(h_ptr + a_row[:, None] + cin[None, :] * s_hc,
                            mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                w_off = (w_rows0 + k0)[:, None] * (NG * C) + n[None, :]
                w_ok = k_ok[:, None] & n_ok[None, :]
                acc0 = _mma(a, tl.load(w_ptr + w_off, mask=w_ok, other=0.0), acc0, WIDEN)
                if NG > 1:
                    acc1 = _mma(a, tl.load(w_ptr + w_off + C, mask=w_ok, other=0.0), acc1, WIDEN)
                if NG > 2:
                    acc2 = _mma(a, tl.load(w_ptr + w_off + 2 * C, mask=w_ok, other=0.0), acc2, WIDEN)
                if NG > 3:
                    acc3 = _mma(a, tl.load(w_ptr + w_off + 3 * C, mask=w_ok, other=0.0), acc3, WIDEN)
            w_rows0 += C
        return acc0, acc1, acc2, acc3

    @triton.jit(do_not_specialize=["t"])  # the step index: one compiled variant for every step
    def _conv_cell_step_kernel(
            h_ptr, w_ptr, xg_ptr, cp_ptr, aux_ptr, len_ptr,
            out_ptr, hs_ptr, c_ptr, cache_ptr,
            t, M, C, H, W, HW, CHW,
            s_hb, s_hc, s_hy, s_hx, s_xb, s_xc, s_xy, s_xx, s_ob, s_oc, s_oy, s_ox,
            IS_GRU: tl.constexpr, HAS_AUX: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr,
            KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
            PH: tl.constexpr, PW: tl.constexpr,
            IS64: tl.constexpr, FIX_BF16: tl.constexpr, WIDEN: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        """One time step for BLOCK_M pixels × BLOCK_C hidden channels (in every gate).

        h_ptr     h_{t-1} [B, C, H, W], strides s_h*       w_ptr   weight_hh as [KH*KW*C, G*C]
        xg_ptr    x_gates_t [B, G*C, H, W], strides s_x*   cp_ptr  c_{t-1} [B, C, H, W] (LSTM)
        aux_ptr   peephole [3, C] (LSTM) / bias_hh [3C] (GRU), when HAS_AUX
        len_ptr   lengths [B] int64, when HAS_LENGTHS       t       this step's time index
        out_ptr   output frame t [B, C, H, W], strides s_o*
        hs_ptr    h state after the step [B, C, H, W] (HAS_LENGTHS: differs from the output)
        c_ptr     c_t [B, C, H, W] (LSTM)                   cache_ptr [B, 4C, H, W] (SAVE)
        Contiguous NCHW: cp, hs, c, cache. M = B*H*W, HW = H*W, CHW = C*H*W (passed: a
        product of two runtime ints would be 32-bit in the kernel).
        """
        G: tl.constexpr = 3 if IS_GRU else 4
        m_ok, b, p, y, x, n, n_ok = _tile(M, C, W, HW, BLOCK_M, BLOCK_C)
        acc0, acc1, acc2, acc3 = _hidden_gemm(h_ptr, w_ptr, b, y, x, m_ok, n, n_ok, C, H, W,
                                              s_hb, s_hc, s_hy, s_hx, G, KH, KW, DH, DW, PH, PW,
                                              IS64, WIDEN, BLOCK_M, BLOCK_C, BLOCK_K)

        # ---- epilogue: the cell, on this tile's pixels and channels of every gate.
        ok = m_ok[:, None] & n_ok[None, :]
        x_row = (b * s_xb + y * s_xy + x * s_xx)[:, None]
        h_off = (b * s_hb + y * s_hy + x * s_hx)[:, None] + n[None, :] * s_hc
        o_off = (b * s_ob + y * s_oy + x * s_ox)[:, None] + n[None, :] * s_oc
        s_off = (b * C)[:, None] * HW + n[None, :] * HW + p[:, None]  # [B, C, H, W] contiguous
        g_off = (b * (4 * C))[:, None] * HW + n[None, :] * HW + p[:, None]  # [B, 4C, H, W]
        if IS_GRU:
            h_prev = _ld(h_ptr + h_off, ok, IS64)
            h_r = acc0
            h_z = acc1
            h_n = acc2
            if HAS_AUX:
                h_r += _ld(aux_ptr + n, n_ok, IS64)[None, :]
                h_z += _ld(aux_ptr + C + n, n_ok, IS64)[None, :]
                h_n += _ld(aux_ptr + 2 * C + n, n_ok, IS64)[None, :]
            r = _sigmoid(_ld(xg_ptr + x_row + n[None, :] * s_xc, ok, IS64) + h_r)
            z = _sigmoid(_ld(xg_ptr + x_row + (n + C)[None, :] * s_xc, ok, IS64) + h_z)
            cand = _tanh(_ld(xg_ptr + x_row + (n + 2 * C)[None, :] * s_xc, ok, IS64) + r * h_n)
            h = (1 - z) * cand + z * h_prev
            if SAVE:
                _st(cache_ptr + g_off, r, ok, FIX_BF16)
                _st(cache_ptr + g_off + CHW, z, ok, FIX_BF16)
                _st(cache_ptr + g_off + 2 * CHW, cand, ok, FIX_BF16)
                _st(cache_ptr + g_off + 3 * CHW, h_n, ok, FIX_BF16)
        else:
            c_prev = _ld(cp_ptr + s_off, ok, IS64)
            a_i = acc0 + _ld(xg_ptr + x_row + n[None, :] * s_xc, ok, IS64)
            a_f = acc1 + _ld(xg_ptr + x_row + (n + C)[None, :] * s_xc, ok, IS64)
            a_g = acc2 + _ld(xg_ptr + x_row + (n + 2 * C)[None, :] * s_xc, ok, IS64)
            a_o = acc3 + _ld(xg_ptr + x_row + (n + 3 * C)[None, :] * s_xc, ok, IS64)
            if HAS_AUX:
                a_i += _ld(aux_ptr + n, n_ok, IS64)[None, :] * c_prev
                a_f += _ld(aux_ptr + C + n, n_ok, IS64)[None, :] * c_prev
            i = _sigmoid(a_i)
            f = _sigmoid(a_f)
            g = _tanh(a_g)
            c = f * c_prev + i * g
            if HAS_AUX:
                a_o += _ld(aux_ptr + 2 * C + n, n_ok, IS64)[None, :] * c
            o = _sigmoid(a_o)
            h = o * _tanh(c)
            if SAVE:
                _st(cache_ptr + g_off, i, ok, FIX_BF16)
                _st(cache_ptr + g_off + CHW, f, ok, FIX_BF16)
                _st(cache_ptr + g_off + 2 * CHW, g, ok, FIX_BF16)
                _st(cache_ptr + g_off + 3 * CHW, o, ok, FIX_BF16)
        if HAS_LENGTHS:
            valid = (t < tl.load(len_ptr + b, mask=m_ok, other=0))[:, None]
            if not IS_GRU:
                c = tl.where(valid, c, c_prev)
                h_prev = _ld(h_ptr + h_off, ok, IS64)
            _st(hs_ptr + s_off, tl.where(valid, h, h_prev), ok, FIX_BF16)
            h = tl.where(valid, h, 0.0)
        _st(out_ptr + o_off, h, ok, FIX_BF16)
        if not IS_GRU:
            _st(c_ptr + s_off, c, ok, FIX_BF16)

    @triton.jit
    def _ballas_reset_kernel(h_ptr, w_ptr, xg_ptr, bias_ptr, reset_ptr, hrz_ptr,
                             M, C, H, W, HW, CHW,
                             s_hb, s_hc, s_hy, s_hx, s_xb, s_xc, s_xy, s_xx,
                             HAS_BIAS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr,
                             DW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, IS64: tl.constexpr,
                             FIX_BF16: tl.constexpr, WIDEN: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        """Ballas GRU step, launch 1 of 2: h_r, h_z = W_rz * h_{t-1} + b_rz, kept in hrz [B, 2C, H, W]
        (accumulation dtype) for launch 2, and reset_h = σ(x_r + h_r) ⊙ h_{t-1} into reset [B, C, H, W]
        (contiguous, input dtype: the operand of the n convolution). w_ptr: W_rz as [KH*KW*C, 2C];
        bias_ptr: b_rz [2C]; other pointers and strides as in _conv_cell_step_kernel."""
        m_ok, b, p, y, x, n, n_ok = _tile(M, C, W, HW, BLOCK_M, BLOCK_C)
        h_r, h_z, _, _ = _hidden_gemm(h_ptr, w_ptr, b, y, x, m_ok, n, n_ok, C, H, W, s_hb, s_hc, s_hy, s_hx,
                                      2, KH, KW, DH, DW, PH, PW, IS64, WIDEN, BLOCK_M, BLOCK_C, BLOCK_K)
        ok = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            h_r += _ld(bias_ptr + n, n_ok, IS64)[None, :]
            h_z += _ld(bias_ptr + C + n, n_ok, IS64)[None, :]
        x_row = (b * s_xb + y * s_xy + x * s_xx)[:, None]
        r = _sigmoid(_ld(xg_ptr + x_row + n[None, :] * s_xc, ok, IS64) + h_r)
        h_prev = _ld(h_ptr + (b * s_hb + y * s_hy + x * s_hx)[:, None] + n[None, :] * s_hc, ok, IS64)
        _st(reset_ptr + (b * C)[:, None] * HW + n[None, :] * HW + p[:, None], r * h_prev, ok, FIX_BF16)
        rz_off = (b * (2 * C))[:, None] * HW + n[None, :] * HW + p[:, None]
        tl.store(hrz_ptr + rz_off, h_r, mask=ok)
        tl.store(hrz_ptr + rz_off + CHW, h_z, mask=ok)

    @triton.jit(do_not_specialize=["t"])
    def _ballas_cell_kernel(reset_ptr, w_ptr, xg_ptr, bias_ptr, hrz_ptr, h_ptr, len_ptr,
                            out_ptr, hs_ptr, cache_ptr,
                            t, M, C, H, W, HW, CHW,
                            s_hb, s_hc, s_hy, s_hx, s_xb, s_xc, s_xy, s_xx, s_ob, s_oc, s_oy, s_ox,
                            HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr,
                            KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                            PH: tl.constexpr, PW: tl.constexpr, IS64: tl.constexpr,
                            FIX_BF16: tl.constexpr, WIDEN: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        """Ballas GRU step, launch 2 of 2: h_n = W_n * reset_h + b_n (reset [B, C, H, W] contiguous,
        w_ptr: W_n as [KH*KW*C, C], bias_ptr: b_n [C]), then the cell with h_r, h_z from hrz:
        r = σ(x_r + h_r), z = σ(x_z + h_z), n = tanh(x_n + h_n), h = (1 - z)·n + z·h_{t-1}; cache
        r, z, n, h_n. h_ptr: h_{t-1}; the rest as in _conv_cell_step_kernel."""
        m_ok, b, p, y, x, n, n_ok = _tile(M, C, W, HW, BLOCK_M, BLOCK_C)
        h_n, _, _, _ = _hidden_gemm(reset_ptr, w_ptr, b, y, x, m_ok, n, n_ok, C, H, W, CHW, HW, W, 1,
                                    1, KH, KW, DH, DW, PH, PW, IS64, WIDEN, BLOCK_M, BLOCK_C, BLOCK_K)
        ok = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            h_n += _ld(bias_ptr + n, n_ok, IS64)[None, :]
        rz_off = (b * (2 * C))[:, None] * HW + n[None, :] * HW + p[:, None]
        x_row = (b * s_xb + y * s_xy + x * s_xx)[:, None]
        r = _sigmoid(_ld(xg_ptr + x_row + n[None, :] * s_xc, ok, IS64) + _ld(hrz_ptr + rz_off, ok, IS64))
        z = _sigmoid(_ld(xg_ptr + x_row + (n + C)[None, :] * s_xc, ok, IS64) + _ld(hrz_ptr + rz_off + CHW, ok, IS64))
        cand = _tanh(_ld(xg_ptr + x_row + (n + 2 * C)[None, :] * s_xc, ok, IS64) + h_n)
        h_prev = _ld(h_ptr + (b * s_hb + y * s_hy + x * s_hx)[:, None] + n[None, :] * s_hc, ok, IS64)
        h = (1 - z) * cand + z * h_prev
        if SAVE:
            g_off = (b * (4 * C))[:, None] * HW + n[None, :] * HW + p[:, None]
            _st(cache_ptr + g_off, r, ok, FIX_BF16)
            _st(cache_ptr + g_off + CHW, z, ok, FIX_BF16)
            _st(cache_ptr + g_off + 2 * CHW, cand, ok, FIX_BF16)
            _st(cache_ptr + g_off + 3 * CHW, h_n, ok, FIX_BF16)
        if HAS_LENGTHS:
            valid = (t < tl.load(len_ptr + b, mask=m_ok, other=0))[:, None]
            _st(hs_ptr + (b * C)[:, None] * HW + n[None, :] * HW + p[:, None], tl.where(valid, h, h_prev), ok,
                FIX_BF16)
            h = tl.where(valid, h, 0.0)
        _st(out_ptr + (b * s_ob + y * s_oy + x * s_ox)[:, None] + n[None, :] * s_oc, h, ok, FIX_BF16)

    # ------------------------------------------------------------------------------ validation
    def _pair_list(fn, name, v, minimum):
        v = [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]
        if len(v) != 2 or any(e < minimum for e in v):
            raise ValueError(f"{fn}: {name} must be two ints >= {minimum} (H, W), got {v}")
        return v

    def _check_same(fn, name, t, ref_name, ref, dtype=True):
        if t.device != ref.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}")
        if dtype and t.dtype != ref.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}, {ref_name} has {ref.dtype}; they must match "
                            "(the convolution multiplies them in one dtype)")

    def _check_sequence(fn, gates, x_gates, weight_hh, h0, padding, dilation):
        """Checks the arguments every sequence op shares; returns (B, T, C, H, W, KH, KW)."""
        check_tensor(fn, "x_gates", x_gates, 5)
        check_tensor(fn, "weight_hh", weight_hh, 4)
        check_tensor(fn, "h0", h0, 4)
        _check_same(fn, "weight_hh", weight_hh, "x_gates", x_gates)
        _check_same(fn, "h0", h0, "x_gates", x_gates)
        B, T, GC, H, W = x_gates.shape
        C = h0.shape[1]
        GCw, Cw, KH, KW = weight_hh.shape
        if (GCw, Cw) != (gates * C, C) or KH < 1 or KW < 1:
            raise ValueError(f"{fn}: weight_hh must be [{gates}*C, C, kH, kW] with C = {C} (h0's channels), "
                             f"got {tuple(weight_hh.shape)}")
        if tuple(h0.shape) != (B, C, H, W):
            raise ValueError(f"{fn}: h0 must be [B, C, H, W] = {(B, C, H, W)} (B, H, W from x_gates), "
                             f"got {tuple(h0.shape)}")
        if GC != gates * C:
            raise ValueError(f"{fn}: x_gates must have {gates}*C = {gates * C} channels, got shape "
                             f"{tuple(x_gates.shape)}")
        (ph, pw), (dh, dw) = padding, dilation
        if H + 2 * ph - dh * (KH - 1) != H or W + 2 * pw - dw * (KW - 1) != W:
            raise ValueError(f"{fn}: padding {padding} with kernel {(KH, KW)} and dilation {dilation} does not "
                             "keep the hidden state's H×W (the recurrence needs a 'same' convolution)")
        return B, T, C, H, W, KH, KW

    def _check_lengths(fn, lengths, B, ref):
        if lengths is None:
            return None
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != B:
            shape = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
            raise ValueError(f"{fn}: lengths must be a 1-D tensor of B = {B} ints, got {shape}")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"{fn}: lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.device != ref.device:
            raise ValueError(f"{fn}: lengths is on {lengths.device} but x_gates is on {ref.device}")
        return lengths.to(torch.int64).contiguous()

    # ------------------------------------------------------------------------------ launch
    def _weight_matrix(weight_hh):
        """weight_hh [G*C, C, KH, KW] as the kernel's GEMM operand [KH*KW*C, G*C] (row tap*C + cin),
        transformed once per sequence call."""
        GC, C, KH, KW = weight_hh.shape
        return weight_hh.permute(2, 3, 1, 0).reshape(KH * KW * C, GC).contiguous()

    def _channels_last(x5):
        return x5.shape[2] > 1 and x5.shape[4] > 1 and x5.stride(2) < x5.stride(4)

    def _output_frames(x_gates, C):
        """[B, T, C, H, W] with x_gates's frame layout (channels-last frames stay channels-last)."""
        B, T, _, H, W = x_gates.shape
        if _channels_last(x_gates):
            return x_gates.new_empty(B, T, H, W, C).permute(0, 1, 4, 2, 3)
        return x_gates.new_empty(B, T, C, H, W)

    def _frame_strides(t):
        """(batch, channel, row, column) strides of a [B, C, H, W] frame or [B, T, C, H, W][:, t] slice."""
        return tuple(t.stride())[-4:] if t.dim() == 4 else None

    def _steps(T, reverse):
        return range(T - 1, -1, -1) if reverse else range(T)

    def _run_sequence(fn, is_gru, x_gates, weight_hh, h0, c0, aux, lengths, padding, dilation, reverse, save,
                      ballas=False):
        """The forward time loop: one fused launch per step (two for the Ballas GRU). Returns (output, h_n,
        c_n, cache, cells), cells being the Ballas GRU's reset_h per step (when saving) for a GRU."""
        gates = 3 if is_gru else 4
        B, T, C, H, W, KH, KW = _check_sequence(fn, gates, x_gates, weight_hh, h0, padding, dilation)
        lengths = _check_lengths(fn, lengths, B, x_gates)
        dtype, dev = x_gates.dtype, x_gates.device
        acc = compute_dtype(dtype)
        output = _output_frames(x_gates, C)
        cache = torch.empty((T, B, 4 * C, H, W) if save else (0,), dtype=dtype, device=dev)
        if is_gru:
            cells = torch.empty((T, B, C, H, W) if save and ballas else (0,), dtype=dtype, device=dev)
        else:
            cells = torch.empty((T, B, C, H, W) if save else (0,), dtype=acc, device=dev)
        c_prev = c0.to(acc).contiguous() if not is_gru else None
        c_ping = [torch.empty((B, C, H, W), dtype=acc, device=dev) for _ in range(2)] \
            if not is_gru and not save else None
        h_ping = [torch.empty((B, C, H, W), dtype=dtype, device=dev) for _ in range(2)] \
            if lengths is not None else None
        h_prev = h0
        launched = T > 0 and _launch(B * C * H * W, x_gates)
        if launched:
            capability, limit = _attention.device_limits(dev)
            meta = launch_config("gru" if is_gru else "lstm", dtype, C, capability, limit, _INTERPRET)
            geometry = dict(KH=KH, KW=KW, DH=dilation[0], DW=dilation[1], PH=padding[0], PW=padding[1],
                            IS64=acc == torch.float64, **meta)
            M = B * H * W
            sizes = (M, C, H, W, H * W, C * H * W)
            grid = (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_C"]))
            dummy = x_gates
            if ballas:
                w_rz, w_n = _weight_matrix(weight_hh[:2 * C]), _weight_matrix(weight_hh[2 * C:])
                b_rz, b_n = (dummy, dummy) if aux is None else (aux[:2 * C].contiguous(), aux[2 * C:].contiguous())
                h_rz = torch.empty((B, 2 * C, H, W), dtype=acc, device=dev)
                reset_tmp = torch.empty((B, C, H, W), dtype=dtype, device=dev)
            else:
                w_mat = _weight_matrix(weight_hh)
            with _common.device_guard(x_gates):
                for s, t in enumerate(_steps(T, reverse)):
                    out_t = output[:, t]
                    h_state = h_ping[s % 2] if lengths is not None else dummy
                    x_t = x_gates[:, t]
                    len_arg = dummy if lengths is None else lengths
                    if ballas:
                        reset = cells[t] if save else reset_tmp
                        wrap_triton(_ballas_reset_kernel)[grid](
                            h_prev, w_rz, x_t, b_rz, reset, h_rz, *sizes,
                            *_frame_strides(h_prev), *_frame_strides(x_t), HAS_BIAS=aux is not None, **geometry)
                        wrap_triton(_ballas_cell_kernel)[grid](
                            reset, w_n, x_t, b_n, h_rz, h_prev, len_arg, out_t, h_state,
                            cache[t] if save else dummy, t, *sizes,
                            *_frame_strides(h_prev), *_frame_strides(x_t), *_frame_strides(out_t),
                            HAS_BIAS=aux is not None, HAS_LENGTHS=lengths is not None, SAVE=save, **geometry)
                    else:
                        c_out = dummy if is_gru else (cells[t] if save else c_ping[s % 2])
                        wrap_triton(_conv_cell_step_kernel)[grid](
                            h_prev, w_mat, x_t, dummy if is_gru else c_prev, dummy if aux is None else aux,
                            len_arg, out_t, h_state, c_out, cache[t] if save else dummy, t, *sizes,
                            *_frame_strides(h_prev), *_frame_strides(x_t), *_frame_strides(out_t),
                            IS_GRU=is_gru, HAS_AUX=aux is not None, HAS_LENGTHS=lengths is not None, SAVE=save,
                            **geometry)
                        c_prev = c_out
                    h_prev = h_state if lengths is not None else out_t
        # Outputs must not alias each other or the inputs: only a ping-pong buffer is returned as is.
        h_n = h_prev.clone()
        c_n = None
        if not is_gru:
            c_n = c_prev if launched and not save else c_prev.clone()
        return output, h_n, c_n, cache, cells

    # ------------------------------------------------------------------------------ backward loops
    def _h_prevs(output, h0, reverse):
        """[T*B, C, H, W]: the h_{t-1} each step's hidden convolution read, in time order."""
        out = output.transpose(0, 1)
        prevs = torch.cat([out[1:], h0[None]]) if reverse else torch.cat([h0[None], out[:-1]])
        return prevs.flatten(0, 1)

    def _previous(t, T, reverse):
        """The time index processed just before t, or None for the first step."""
        prev = t + 1 if reverse else t - 1
        return prev if 0 <= prev < T else None

    def _check_saved(fn, name, t, shape):
        check_tensor(fn, name, t, len(shape))
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")

    # ------------------------------------------------------------------------------ op bodies
    def _convlstm_hidden_impl(x_gates: torch.Tensor, weight_hh: torch.Tensor, h0: torch.Tensor,
                              c0: torch.Tensor, peephole: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
                              padding: List[int], dilation: List[int], reverse: bool, save: bool
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "triton_convlstm_hidden"
        padding = _pair_list(fn, "padding", padding, 0)
        dilation = _pair_list(fn, "dilation", dilation, 1)
        _check_sequence(fn, 4, x_gates, weight_hh, h0, padding, dilation)  # h0 first: c0 is checked against it
        check_tensor(fn, "c0", c0, 4)
        _check_same(fn, "c0", c0, "x_gates", x_gates, dtype=False)
        if tuple(c0.shape) != tuple(h0.shape):
            raise ValueError(f"{fn}: c0 must have h0's shape {tuple(h0.shape)}, got {tuple(c0.shape)}")
        if peephole is not None:
            check_tensor(fn, "peephole", peephole, 2)
            _check_same(fn, "peephole", peephole, "x_gates", x_gates, dtype=False)
            if tuple(peephole.shape) != (3, h0.shape[1]):
                raise ValueError(f"{fn}: peephole must be [3, C] = (3, {h0.shape[1]}), got {tuple(peephole.shape)}")
            peephole = peephole.contiguous()
        output, h_n, c_n, gates, cells = _run_sequence(fn, False, x_gates, weight_hh, h0, c0, peephole, lengths,
                                                       padding, dilation, reverse, save)
        return output, h_n, c_n, gates, cells

    def _convlstm_hidden_backward_impl(grad_output: Optional[torch.Tensor], grad_h_n: Optional[torch.Tensor],
                                       grad_c_n: Optional[torch.Tensor], weight_hh: torch.Tensor, h0: torch.Tensor,
                                       c0: torch.Tensor, peephole: Optional[torch.Tensor], output: torch.Tensor,
                                       gates: torch.Tensor, cells: torch.Tensor, padding: List[int],
                                       dilation: List[int], reverse: bool
                                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
        fn = "triton_convlstm_hidden_backward"
        B, T, C, H, W = output.shape
        _check_saved(fn, "gates", gates, (T, B, 4 * C, H, W))
        _check_saved(fn, "cells", cells, (T, B, C, H, W))
        acc = compute_dtype(gates.dtype)
        c0_acc = c0.to(acc)
        grad_gates = gates.new_empty(B, T, 4 * C, H, W)
        grad_peephole = torch.zeros((3, C) if peephole is not None else (0,), dtype=acc, device=gates.device)
        dh, dc = grad_h_n, grad_c_n
        for t in reversed(_steps(T, reverse)):
            prev = _previous(t, T, reverse)
            h_prev = h0 if prev is None else output[:, prev]
            c_prev = c0_acc if prev is None else cells[prev]
            if grad_output is not None:
                dh = grad_output[:, t] if dh is None else dh + grad_output[:, t]
            gg, dc = torch.ops.fastvid.triton_lstm_cell_backward(dh, dc, gates[t], c_prev, cells[t], peephole)
            grad_gates[:, t] = gg
            if peephole is not None:
                d = gg.to(acc).unflatten(1, (4, C))
                grad_peephole += torch.stack([(d[:, 0] * c_prev).sum((0, 2, 3)), (d[:, 1] * c_prev).sum((0, 2, 3)),
                                              (d[:, 3] * cells[t]).sum((0, 2, 3))])
            dh = torch.nn.grad.conv2d_input(h_prev.shape, weight_hh, gg, padding=padding, dilation=dilation)
        grad_weight = torch.nn.grad.conv2d_weight(_h_prevs(output, h0, reverse), weight_hh.shape,
                                                  grad_gates.transpose(0, 1).flatten(0, 1),
                                                  padding=padding, dilation=dilation)
        grad_h0 = torch.zeros_like(h0) if dh is None else dh.to(h0.dtype)
        grad_c0 = torch.zeros_like(c0) if dc is None else dc.to(c0.dtype)
        return grad_gates, grad_weight, grad_h0, grad_c0, grad_peephole

    def _convgru_hidden_impl(x_gates: torch.Tensor, weight_hh: torch.Tensor, bias_hh: Optional[torch.Tensor],
                             h0: torch.Tensor, lengths: Optional[torch.Tensor], padding: List[int],
                             dilation: List[int], reset_after: bool, reverse: bool, save: bool
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "triton_convgru_hidden"
        padding = _pair_list(fn, "padding", padding, 0)
        dilation = _pair_list(fn, "dilation", dilation, 1)
        if bias_hh is not None:
            check_tensor(fn, "bias_hh", bias_hh, 1)
            _check_same(fn, "bias_hh", bias_hh, "x_gates", x_gates)  # as the C++ op: one dtype with x
            if bias_hh.shape[0] != 3 * h0.shape[1]:
                raise ValueError(f"{fn}: bias_hh must be [3*C] = [{3 * h0.shape[1]}], got {tuple(bias_hh.shape)}")
            bias_hh = bias_hh.contiguous()
        output, h_n, _, cache, resets = _run_sequence(fn, True, x_gates, weight_hh, h0, None, bias_hh, lengths,
                                                      padding, dilation, reverse, save, ballas=not reset_after)
        return output, h_n, cache, resets

    def _convgru_hidden_backward_impl(grad_output: Optional[torch.Tensor], grad_h_n: Optional[torch.Tensor],
                                      weight_hh: torch.Tensor, h0: torch.Tensor, output: torch.Tensor,
                                      cache: torch.Tensor, resets: torch.Tensor, padding: List[int],
                                      dilation: List[int], reset_after: bool, reverse: bool
                                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "triton_convgru_hidden_backward"
        B, T, C, H, W = output.shape
        _check_saved(fn, "cache", cache, (T, B, 4 * C, H, W))
        if not reset_after:
            _check_saved(fn, "resets", resets, (T, B, C, H, W))
        acc = compute_dtype(cache.dtype)
        grad_x = cache.new_empty(B, T, 3 * C, H, W)
        grad_hg = cache.new_empty(T, B, 3 * C, H, W)  # d(hidden conv outputs): h_r, h_z, h_n
        conv = dict(padding=padding, dilation=dilation)
        dh = grad_h_n
        for t in reversed(_steps(T, reverse)):
            prev = _previous(t, T, reverse)
            h_prev = h0 if prev is None else output[:, prev]
            if grad_output is not None:
                dh = grad_output[:, t] if dh is None else dh + grad_output[:, t]
            if dh is None:
                dh = torch.zeros_like(h_prev)
            gx, ghg, dhp = torch.ops.fastvid.triton_gru_cell_backward(dh, cache[t], h_prev, reset_after)
            if reset_after:
                dh = dhp + torch.nn.grad.conv2d_input(h_prev.shape, weight_hh, ghg, **conv)
            else:
                # reset_h = r ⊙ h_prev fed the n convolution: its gradient reaches r's pre-activation and h_prev.
                d_reset = torch.nn.grad.conv2d_input(h_prev.shape, weight_hh[2 * C:], ghg[:, 2 * C:], **conv).to(acc)
                r = cache[t][:, :C].to(acc)
                d_r_pre = (d_reset * h_prev.to(acc) * r * (1 - r)).to(ghg.dtype)
                gx[:, :C] = d_r_pre
                ghg[:, :C] = d_r_pre
                dh = (dhp.to(acc) + d_reset * r).to(dhp.dtype) + torch.nn.grad.conv2d_input(
                    h_prev.shape, weight_hh[:2 * C], ghg[:, :2 * C], **conv)
            grad_x[:, t] = gx
            grad_hg[t] = ghg
        h_prevs = _h_prevs(output, h0, reverse)
        if reset_after:
            grad_weight = torch.nn.grad.conv2d_weight(h_prevs, weight_hh.shape, grad_hg.flatten(0, 1), **conv)
        else:
            w_rz, w_n = weight_hh[:2 * C], weight_hh[2 * C:]
            grad_weight = torch.cat([
                torch.nn.grad.conv2d_weight(h_prevs, w_rz.shape, grad_hg[:, :, :2 * C].flatten(0, 1), **conv),
                torch.nn.grad.conv2d_weight(resets.flatten(0, 1), w_n.shape, grad_hg[:, :, 2 * C:].flatten(0, 1),
                                            **conv)])
        grad_bias = grad_hg.sum((0, 1, 3, 4), dtype=acc).to(cache.dtype)
        grad_h0 = torch.zeros_like(h0) if dh is None else dh.to(h0.dtype)
        return grad_x, grad_weight, grad_bias, grad_h0

    # ------------------------------------------------------------------------------ autograd
    def _convlstm_setup(ctx, inputs, output):
        x_gates, weight_hh, h0, c0, peephole, lengths, padding, dilation, reverse, save = inputs
        out, _, _, gates, cells = output
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the (large) cache outputs
        ctx.save_for_backward(weight_hh, h0, c0, peephole, out, gates, cells)
        ctx.args = (padding, dilation, reverse)
        ctx.refuse = _refusal("convlstm", lengths, save)

    def _refusal(name, lengths, save):
        if not save:
            return f"fastvid.{name} (triton): backward through a call made with save=False"
        if lengths is not None:
            return f"fastvid.{name} (triton): backward with lengths is not supported by the fused Triton path"
        return None

    def _convlstm_backward(ctx, grad_output, grad_h_n, grad_c_n, *_cache_grads):
        if ctx.refuse:
            raise RuntimeError(ctx.refuse)
        weight_hh, h0, c0, peephole, out, gates, cells = ctx.saved_tensors
        if grad_output is None and grad_h_n is None and grad_c_n is None:
            return (None,) * 10
        gx, gw, gh0, gc0, gpeep = torch.ops.fastvid.triton_convlstm_hidden_backward(
            grad_output, grad_h_n, grad_c_n, weight_hh, h0, c0, peephole, out, gates, cells, *ctx.args)
        gpeep = gpeep.to(peephole.dtype) if peephole is not None else None
        return gx, gw, gh0, gc0, gpeep, None, None, None, None, None

    def _convgru_setup(ctx, inputs, output):
        x_gates, weight_hh, bias_hh, h0, lengths, padding, dilation, reset_after, reverse, save = inputs
        out, _, cache, resets = output
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(weight_hh, h0, out, cache, resets)
        ctx.args = (padding, dilation, reset_after, reverse)
        ctx.has_bias = bias_hh is not None
        ctx.refuse = _refusal("convgru", lengths, save)

    def _convgru_backward(ctx, grad_output, grad_h_n, *_cache_grads):
        if ctx.refuse:
            raise RuntimeError(ctx.refuse)
        weight_hh, h0, out, cache, resets = ctx.saved_tensors
        if grad_output is None and grad_h_n is None:
            return (None,) * 10
        gx, gw, gb, gh0 = torch.ops.fastvid.triton_convgru_hidden_backward(
            grad_output, grad_h_n, weight_hh, h0, out, cache, resets, *ctx.args)
        return gx, gw, gb if ctx.has_bias else None, gh0, None, None, None, None, None, None

    register_ops((
        ("triton_convlstm_hidden", _convlstm_hidden_impl, _convlstm_backward, _convlstm_setup),
        ("triton_convlstm_hidden_backward", _convlstm_hidden_backward_impl, None, None),
        ("triton_convgru_hidden", _convgru_hidden_impl, _convgru_backward, _convgru_setup),
        ("triton_convgru_hidden_backward", _convgru_hidden_backward_impl, None, None),
    ))

    # ------------------------------------------------------------------------------ public API
    def _input_gates(x, weight_ih, bias, padding, dilation):
        """The input convolution of all B*T frames at once (native; autograd differentiates it)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise ValueError(f"fastvid.triton convolution: x must be [B, T, C_in, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        B, T = x.shape[:2]
        x_gates = F.conv2d(x.flatten(0, 1), weight_ih, bias, padding=tuple(padding), dilation=tuple(dilation))
        return x_gates.unflatten(0, (B, T))

    def _save(*tensors):
        return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)

    def convlstm_hidden(x_gates, weight_hh, h0, c0, peephole=None, lengths=None, padding=(1, 1), dilation=(1, 1),
                        reverse=False):
        """The recurrent part of a ConvLSTM layer over precomputed input gates ``x_gates``
        ``[B, T, 4C, H, W]`` (bias included). Returns ``(output, h_n, c_n)``."""
        save = _save(x_gates, weight_hh, h0, c0, peephole)
        output, h_n, c_n, _, _ = torch.ops.fastvid.triton_convlstm_hidden(
            x_gates, weight_hh, h0, c0, peephole, lengths, list(padding), list(dilation), bool(reverse), save)
        return output, h_n, c_n

    def convgru_hidden(x_gates, weight_hh, bias_hh, h0, lengths=None, padding=(1, 1), dilation=(1, 1),
                       reset_after=True, reverse=False):
        """The recurrent part of a ConvGRU layer over precomputed input gates ``x_gates``
        ``[B, T, 3C, H, W]`` (b_ih included). Returns ``(output, h_n)``."""
        save = _save(x_gates, weight_hh, bias_hh, h0)
        output, h_n, _, _ = torch.ops.fastvid.triton_convgru_hidden(
            x_gates, weight_hh, bias_hh, h0, lengths, list(padding), list(dilation), bool(reset_after), bool(reverse),
            save)
        return output, h_n

    def convlstm(x, weight_ih, weight_hh, bias, h0, c0, peephole, padding, dilation, reverse=False, lengths=None):
        """A ConvLSTM layer: input convolution over all frames, then one fused launch per step.
        Returns ``(output, h_n, c_n)``."""
        x_gates = _input_gates(x, weight_ih, bias, padding, dilation)
        return convlstm_hidden(x_gates, weight_hh, h0, c0, peephole, lengths, padding, dilation, reverse)

    def convgru(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, padding, dilation, reset_after=True, reverse=False,
                lengths=None):
        """A ConvGRU layer: input convolution over all frames, then one fused launch per step (two for
        reset_after=False). Returns ``(output, h_n)``."""
        x_gates = _input_gates(x, weight_ih, bias_ih, padding, dilation)
        return convgru_hidden(x_gates, weight_hh, bias_hh, h0, lengths, padding, dilation, reset_after, reverse)
