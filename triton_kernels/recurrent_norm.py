"""Triton kernels of one layer-normalised ConvLSTM step (``norm="layer"``), registered as PyTorch ops.

Installed as ``fastvid.triton_kernels.recurrent_norm``. Equations: ``fastvid/reference/recurrent_norm.py``
(the oracle); the passes mirror the CPU kernels of ``csrc/recurrent/recurrent_norm_cpu.cpp``.

One program per sample does the whole step (LSTM; the GRU kernels likewise), so the per-sample statistics need no second launch or
atomics: forward = sums of x_pre and h_pre, their squared deviations, gates + cell (+ the sum of c),
the squared deviations of c, then h = o tanh(LN(c)); backward = the LN(c) gradient sums, the gate
gradients + dc_prev (+ the LN(x_pre) / LN(h_pre) sums), then dL/dx_pre and dL/dh_pre. Each pass loops
over the sample in BLOCK-element chunks. Tensors are NCHW-contiguous ``[B, G*C, H, W]``; gate q of
hidden cell e = (channel, pixel) of sample b sits at ``b*4*C*HW + q*C*HW + e``. Statistics and gate math
in fp32 (fp64 for fp64 tensors). A program per sample leaves a GPU with B programs per step: enough
to be correct and fused, not to fill a large GPU at small B (a split reduction is the next step).

Ops (autograd on the forward op; the backward op refuses double backward):

* ``fastvid::triton_ln_lstm_cell(x_pre, h_pre, c_prev, bias?, gain_ih, gain_hh, gain_c, bias_c)
  -> (h, c, gates, stats)`` with ``stats`` ``[B, 6]`` = mean, 1/sqrt(var + eps) of x_pre, h_pre, c
* ``fastvid::triton_ln_lstm_cell_backward(grad_h?, grad_c?, x_pre, h_pre, c_prev, c, gates, stats,
  gain_ih, gain_hh, gain_c, bias_c) -> (grad_x_pre, grad_h_pre, grad_c_prev, grad_gates_pre, grad_norm_c)``
* ``fastvid::triton_ln_gru_cell(x_pre, h_pre, h_prev, bias_ih?, bias_hh?, gain_ih, gain_hh) -> (h, stats)``
  (reset_after form; ``stats`` ``[B, 4]`` for x_pre, h_pre; backward recomputes the gates)
* ``fastvid::triton_ln_gru_cell_backward(grad_h, x_pre, h_pre, h_prev, stats, bias_ih?, bias_hh?, gain_ih,
  gain_hh) -> (grad_x_pre, grad_h_pre, grad_h_prev, grad_x_gates, grad_h_gates)``
"""
from typing import Optional, Tuple

import torch

from fastvid.reference.recurrent import compute_dtype
from fastvid.reference.recurrent_norm import EPS

from ._common import AVAILABLE, tl, triton

__all__ = ["AVAILABLE", "BLOCK_SIZE", "ln_lstm_cell", "ln_gru_cell"]

BLOCK_SIZE = 1024  # elements per chunk of a pass; module-level so tests can shrink it

if AVAILABLE:
    from torch.library import wrap_triton  # bare name: torch's kernel discovery looks for it

    from . import _common
    from ._common import FIX_BF16 as _FIX_BF16
    from ._common import check_tensor, ld as _ld, register_ops, should_launch, st as _st

    _launch = should_launch  # module attribute: tests/_triton_compile.py records launches through it
    from .recurrent import _sigmoid, _tanh

    @triton.jit
    def _zeros(BLOCK: tl.constexpr, IS64: tl.constexpr):
        if IS64:
            z = tl.zeros([BLOCK], dtype=tl.float64)
        else:
            z = tl.zeros([BLOCK], dtype=tl.float32)
        return z

    @triton.jit
    def _moments(ptr, n, eps, BLOCK: tl.constexpr, IS64: tl.constexpr):
        """Mean and 1/sqrt(var + eps) of n contiguous elements (two passes)."""
        total = _zeros(BLOCK, IS64)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            total += _ld(ptr + offs, offs < n, IS64)
        mean = tl.sum(total, axis=0) / n
        m2 = _zeros(BLOCK, IS64)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            d = tl.where(mask, _ld(ptr + offs, mask, IS64) - mean, 0.0)
            m2 += d * d
        return mean, 1.0 / tl.sqrt(tl.sum(m2, axis=0) / n + eps)

    @triton.jit
    def _ln_lstm_fwd_kernel(xp_ptr, hp_ptr, bias_ptr, gih_ptr, ghh_ptr, gc_ptr, bc_ptr, cp_ptr,
                            h_ptr, c_ptr, gates_ptr, stats_ptr, C, HW, eps,
                            HAS_BIAS: tl.constexpr, IS64: tl.constexpr, FIX_BF16: tl.constexpr,
                            BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        CHW = tl.cast(C, tl.int64) * HW
        g_base = b * 4 * CHW
        s_base = b * CHW
        mx, rx = _moments(xp_ptr + g_base, 4 * CHW, eps, BLOCK, IS64)
        mh, rh = _moments(hp_ptr + g_base, 4 * CHW, eps, BLOCK, IS64)
        # gates and cell; the sum of c
        c_total = _zeros(BLOCK, IS64)
        for start in range(0, CHW, BLOCK):
            e = start + tl.arange(0, BLOCK)
            mask = e < CHW
            ch = e // HW
            a_i = _ld(gih_ptr + ch, mask, IS64) * (_ld(xp_ptr + g_base + e, mask, IS64) - mx) * rx + \
                _ld(ghh_ptr + ch, mask, IS64) * (_ld(hp_ptr + g_base + e, mask, IS64) - mh) * rh
            a_f = _ld(gih_ptr + C + ch, mask, IS64) * (_ld(xp_ptr + g_base + CHW + e, mask, IS64) - mx) * rx + \
                _ld(ghh_ptr + C + ch, mask, IS64) * (_ld(hp_ptr + g_base + CHW + e, mask, IS64) - mh) * rh
            a_g = _ld(gih_ptr + 2 * C + ch, mask, IS64) * (_ld(xp_ptr + g_base + 2 * CHW + e, mask, IS64) - mx) * rx + \
                _ld(ghh_ptr + 2 * C + ch, mask, IS64) * (_ld(hp_ptr + g_base + 2 * CHW + e, mask, IS64) - mh) * rh
            a_o = _ld(gih_ptr + 3 * C + ch, mask, IS64) * (_ld(xp_ptr + g_base + 3 * CHW + e, mask, IS64) - mx) * rx + \
                _ld(ghh_ptr + 3 * C + ch, mask, IS64) * (_ld(hp_ptr + g_base + 3 * CHW + e, mask, IS64) - mh) * rh
            if HAS_BIAS:
                a_i += _ld(bias_ptr + ch, mask, IS64)
                a_f += _ld(bias_ptr + C + ch, mask, IS64)
                a_g += _ld(bias_ptr + 2 * C + ch, mask, IS64)
                a_o += _ld(bias_ptr + 3 * C + ch, mask, IS64)
            i = _sigmoid(a_i)
            f = _sigmoid(a_f)
            g = _tanh(a_g)
            o = _sigmoid(a_o)
            c = f * _ld(cp_ptr + s_base + e, mask, IS64) + i * g
            _st(c_ptr + s_base + e, c, mask, FIX_BF16)
            _st(gates_ptr + g_base + e, i, mask, FIX_BF16)
            _st(gates_ptr + g_base + CHW + e, f, mask, FIX_BF16)
            _st(gates_ptr + g_base + 2 * CHW + e, g, mask, FIX_BF16)
            _st(gates_ptr + g_base + 3 * CHW + e, o, mask, FIX_BF16)
            c_total += tl.where(mask, c, 0.0)
        tl.debug_barrier()  # c is re-read below, by other threads of this program
        mc = tl.sum(c_total, axis=0) / CHW
        c_m2 = _zeros(BLOCK, IS64)
        for start in range(0, CHW, BLOCK):
            e = start + tl.arange(0, BLOCK)
            mask = e < CHW
            d = tl.where(mask, _ld(c_ptr + s_base + e, mask, IS64) - mc, 0.0)
            c_m2 += d * d
        rc = 1.0 / tl.sqrt(tl.sum(c_m2, axis=0) / CHW + eps)
        # h = o tanh(LN(c))
        for start in range(0, CHW, BLOCK):
            e = start + tl.arange(0, BLOCK)
            mask = e < CHW
            ch = e // HW
            n = _ld(gc_ptr + ch, mask, IS64) * (_ld(c_ptr + s_base + e, mask, IS64) - mc) * rc + \
                _ld(bc_ptr + ch, mask, IS64)
            o = _ld(gates_ptr + g_base + 3 * CHW + e, mask, IS64)
            _st(h_ptr + s_base + e, o * _tanh(n), mask, FIX_BF16)
        s_offs = tl.arange(0, 8)
        values = tl.where(s_offs == 0, mx, tl.where(s_offs == 1, rx, tl.where(s_offs == 2, mh, tl.where(
            s_offs == 3, rh, tl.where(s_offs == 4, mc, rc)))))
        _st(stats_ptr + b * 6 + s_offs, values, s_offs < 6, FIX_BF16)

    @triton.jit
    def _ln_lstm_bwd_kernel(dh_ptr, dc_ptr, xp_ptr, hp_ptr, cp_ptr, c_ptr, gates_ptr, stats_ptr,
                            gih_ptr, ghh_ptr, gc_ptr, bc_ptr, dxp_ptr, dhp_ptr, dcp_ptr, dg_ptr, dn_ptr,
                            C, HW, HAS_DH: tl.constexpr, HAS_DC: tl.constexpr, IS64: tl.constexpr,
                            FIX_BF16: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        CHW = tl.cast(C, tl.int64) * HW
        g_base = b * 4 * CHW
        s_base = b * CHW
        mx = _ld(stats_ptr + b * 6, True, IS64)
        rx = _ld(stats_ptr + b * 6 + 1, True, IS64)
        mh = _ld(stats_ptr + b * 6 + 2, True, IS64)
        rh = _ld(stats_ptr + b * 6 + 3, True, IS64)
        mc = _ld(stats_ptr + b * 6 + 4, True, IS64)
        rc = _ld(stats_ptr + b * 6 + 5, True, IS64)
        # 1. dL/dLN(c), dL/da_o; Σ dĉ, Σ dĉ·ĉ
        s1 = _zeros(BLOCK, IS64)
        s2 = _zeros(BLOCK, IS64)
        for start in range(0, CHW, BLOCK):
            e = start + tl.arange(0, BLOCK)
            mask = e < CHW
            ch = e // HW
            dh = _zeros(BLOCK, IS64)
            if HAS_DH:
                dh = _ld(dh_ptr + s_base + e, mask, IS64)
            gc = _ld(gc_ptr + ch, mask, IS64)
            c_hat = (_ld(c_ptr + s_base + e, mask, IS64) - mc) * rc
            tn = _tanh(gc * c_hat + _ld(bc_ptr + ch, mask, IS64))
            o = _ld(gates_ptr + g_base + 3 * CHW + e, mask, IS64)
            dn = dh * o * (1 - tn * tn)
            _st(dn_ptr + s_base + e, dn, mask, FIX_BF16)
            _st(dg_ptr + g_base + 3 * CHW + e, dh * tn * o * (1 - o), mask, FIX_BF16)
            s1 += tl.where(mask, dn * gc, 0.0)
            s2 += tl.where(mask, dn * gc * c_hat, 0.0)
        m1 = tl.sum(s1, axis=0) / CHW
        m2 = tl.sum(s2, axis=0) / CHW
        tl.debug_barrier()
        # 2. dc in full, d a_i, d a_f, d a_g, dc_prev; Σ u, Σ u·x̂ for both norms (u = γ dL/da)
        x1 = _zeros(BLOCK, IS64)
        x2 = _zeros(BLOCK, IS64)
        h1 = _zeros(BLOCK, IS64)
        h2 = _zeros(BLOCK, IS64)
        for start in range(0, CHW, BLOCK):
            e = start + tl.arange(0, BLOCK)
            mask = e < CHW
            ch = e // HW
            c_hat = (_ld(c_ptr + s_base + e, mask, IS64) - mc) * rc
            dc = _zeros(BLOCK, IS64)
            if HAS_DC:
                dc = _ld(dc_ptr + s_base + e, mask, IS64)
            dc = dc + rc * (_ld(dn_ptr + s_base + e, mask, IS64) * _ld(gc_ptr + ch, mask, IS64) - m1 - c_hat * m2)
            i = _ld(gates_ptr + g_base + e, mask, IS64)
            f = _ld(gates_ptr + g_base + CHW + e, mask, IS64)
            g = _ld(gates_ptr + g_base + 2 * CHW + e, mask, IS64)
            _st(dg_ptr + g_base + e, dc * g * i * (1 - i), mask, FIX_BF16)
            _st(dg_ptr + g_base + CHW + e, dc * _ld(cp_ptr + s_base + e, mask, IS64) * f * (1 - f), mask, FIX_BF16)
            _st(dg_ptr + g_base + 2 * CHW + e, dc * i * (1 - g * g), mask, FIX_BF16)
            _st(dcp_ptr + s_base + e, dc * f, mask, FIX_BF16)
        tl.debug_barrier()
        for start in range(0, 4 * CHW, BLOCK):
            e = start + tl.arange(0, BLOCK)
            mask = e < 4 * CHW
            ch = e // HW
            d = _ld(dg_ptr + g_base + e, mask, IS64)
            ux = d * _ld(gih_ptr + ch, mask, IS64)
            uh = d * _ld(ghh_ptr + ch, mask, IS64)
            x1 += ux
            x2 += ux * tl.where(mask, (_ld(xp_ptr + g_base + e, mask, IS64) - mx) * rx, 0.0)
            h1 += uh
            h2 += uh * tl.where(mask, (_ld(hp_ptr + g_base + e, mask, IS64) - mh) * rh, 0.0)
        n4 = 4 * CHW
        mx1 = tl.sum(x1, axis=0) / n4
        mx2 = tl.sum(x2, axis=0) / n4
        mh1 = tl.sum(h1, axis=0) / n4
        mh2 = tl.sum(h2, axis=0) / n4
        # 3. dL/dx_pre, dL/dh_pre
        for start in range(0, 4 * CHW, BLOCK):
            e = start + tl.arange(0, BLOCK)
            mask = e < 4 * CHW
            ch = e // HW
            d = _ld(dg_ptr + g_base + e, mask, IS64)
            x_hat = (_ld(xp_ptr + g_base + e, mask, IS64) - mx) * rx
            h_hat = (_ld(hp_ptr + g_base + e, mask, IS64) - mh) * rh
            _st(dxp_ptr + g_base + e, rx * (d * _ld(gih_ptr + ch, mask, IS64) - mx1 - x_hat * mx2), mask, FIX_BF16)
            _st(dhp_ptr + g_base + e, rh * (d * _ld(ghh_ptr + ch, mask, IS64) - mh1 - h_hat * mh2), mask, FIX_BF16)

    @triton.jit
    def _gru_gates(xp_ptr, hp_ptr, bih_ptr, bhh_ptr, gih_ptr, ghh_ptr, g_base, e, mask, ch, C, CHW,
                   mx, rx, mh, rh, HAS_BIAS_IH: tl.constexpr, HAS_BIAS_HH: tl.constexpr, IS64: tl.constexpr):
        """Normalised (+ bias) x_r, x_z, x_n, h_r, h_z, h_n of hidden cells e of one sample."""
        x_r = _ld(gih_ptr + ch, mask, IS64) * (_ld(xp_ptr + g_base + e, mask, IS64) - mx) * rx
        x_z = _ld(gih_ptr + C + ch, mask, IS64) * (_ld(xp_ptr + g_base + CHW + e, mask, IS64) - mx) * rx
        x_n = _ld(gih_ptr + 2 * C + ch, mask, IS64) * (_ld(xp_ptr + g_base + 2 * CHW + e, mask, IS64) - mx) * rx
        h_r = _ld(ghh_ptr + ch, mask, IS64) * (_ld(hp_ptr + g_base + e, mask, IS64) - mh) * rh
        h_z = _ld(ghh_ptr + C + ch, mask, IS64) * (_ld(hp_ptr + g_base + CHW + e, mask, IS64) - mh) * rh
        h_n = _ld(ghh_ptr + 2 * C + ch, mask, IS64) * (_ld(hp_ptr + g_base + 2 * CHW + e, mask, IS64) - mh) * rh
        if HAS_BIAS_IH:
            x_r += _ld(bih_ptr + ch, mask, IS64)
            x_z += _ld(bih_ptr + C + ch, mask, IS64)
            x_n += _ld(bih_ptr + 2 * C + ch, mask, IS64)
        if HAS_BIAS_HH:
            h_r += _ld(bhh_ptr + ch, mask, IS64)
            h_z += _ld(bhh_ptr + C + ch, mask, IS64)
            h_n += _ld(bhh_ptr + 2 * C + ch, mask, IS64)
        return x_r, x_z, x_n, h_r, h_z, h_n

    @triton.jit
    def _ln_gru_fwd_kernel(xp_ptr, hp_ptr, bih_ptr, bhh_ptr, gih_ptr, ghh_ptr, hprev_ptr, h_ptr, stats_ptr,
                           C, HW, eps, HAS_BIAS_IH: tl.constexpr, HAS_BIAS_HH: tl.constexpr, IS64: tl.constexpr,
                           FIX_BF16: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        CHW = tl.cast(C, tl.int64) * HW
        g_base = b * 3 * CHW
        s_base = b * CHW
        mx, rx = _moments(xp_ptr + g_base, 3 * CHW, eps, BLOCK, IS64)
        mh, rh = _moments(hp_ptr + g_base, 3 * CHW, eps, BLOCK, IS64)
        for start in range(0, CHW, BLOCK):
            e = start + tl.arange(0, BLOCK)
            mask = e < CHW
            x_r, x_z, x_n, h_r, h_z, h_n = _gru_gates(xp_ptr, hp_ptr, bih_ptr, bhh_ptr, gih_ptr, ghh_ptr, g_base, e,
                                                      mask, e // HW, C, CHW, mx, rx, mh, rh, HAS_BIAS_IH,
                                                      HAS_BIAS_HH, IS64)
            r = _sigmoid(x_r + h_r)
            z = _sigmoid(x_z + h_z)
            n = _tanh(x_n + r * h_n)
            _st(h_ptr + s_base + e, (1 - z) * n + z * _ld(hprev_ptr + s_base + e, mask, IS64), mask, FIX_BF16)
        s_offs = tl.arange(0, 4)
        values = tl.where(s_offs == 0, mx, tl.where(s_offs == 1, rx, tl.where(s_offs == 2, mh, rh)))
        _st(stats_ptr + b * 4 + s_offs, values, s_offs < 4, FIX_BF16)

    @triton.jit
    def _norm_input_grad(d_ptr, v_ptr, g_ptr, dv_ptr, base, n, HW, mean, rstd, BLOCK: tl.constexpr,
                         IS64: tl.constexpr, FIX_BF16: tl.constexpr):
        """dL/dv = r (u - mean(u) - v̂ mean(u v̂)), u = γ dL/dLN(v), over one sample's n elements."""
        s1 = _zeros(BLOCK, IS64)
        s2 = _zeros(BLOCK, IS64)
        for start in range(0, n, BLOCK):
            e = start + tl.arange(0, BLOCK)
            mask = e < n
            u = _ld(d_ptr + base + e, mask, IS64) * _ld(g_ptr + e // HW, mask, IS64)
            s1 += u
            s2 += u * tl.where(mask, (_ld(v_ptr + base + e, mask, IS64) - mean) * rstd, 0.0)
        m1 = tl.sum(s1, axis=0) / n
        m2 = tl.sum(s2, axis=0) / n
        for start in range(0, n, BLOCK):
            e = start + tl.arange(0, BLOCK)
            mask = e < n
            u = _ld(d_ptr + base + e, mask, IS64) * _ld(g_ptr + e // HW, mask, IS64)
            v_hat = (_ld(v_ptr + base + e, mask, IS64) - mean) * rstd
            _st(dv_ptr + base + e, rstd * (u - m1 - v_hat * m2), mask, FIX_BF16)

    @triton.jit
    def _ln_gru_bwd_kernel(dh_ptr, xp_ptr, hp_ptr, hprev_ptr, stats_ptr, bih_ptr, bhh_ptr, gih_ptr, ghh_ptr,
                           dxp_ptr, dhp_ptr, dhprev_ptr, dxg_ptr, dhg_ptr, C, HW,
                           HAS_BIAS_IH: tl.constexpr, HAS_BIAS_HH: tl.constexpr, IS64: tl.constexpr,
                           FIX_BF16: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        CHW = tl.cast(C, tl.int64) * HW
        g_base = b * 3 * CHW
        s_base = b * CHW
        mx = _ld(stats_ptr + b * 4, True, IS64)
        rx = _ld(stats_ptr + b * 4 + 1, True, IS64)
        mh = _ld(stats_ptr + b * 4 + 2, True, IS64)
        rh = _ld(stats_ptr + b * 4 + 3, True, IS64)
        for start in range(0, CHW, BLOCK):
            e = start + tl.arange(0, BLOCK)
            mask = e < CHW
            x_r, x_z, x_n, h_r, h_z, h_n = _gru_gates(xp_ptr, hp_ptr, bih_ptr, bhh_ptr, gih_ptr, ghh_ptr, g_base, e,
                                                      mask, e // HW, C, CHW, mx, rx, mh, rh, HAS_BIAS_IH,
                                                      HAS_BIAS_HH, IS64)
            r = _sigmoid(x_r + h_r)
            z = _sigmoid(x_z + h_z)
            n = _tanh(x_n + r * h_n)
            dh = _ld(dh_ptr + s_base + e, mask, IS64)
            d_n = dh * (1 - z) * (1 - n * n)
            d_z = dh * (_ld(hprev_ptr + s_base + e, mask, IS64) - n) * z * (1 - z)
            d_r = d_n * h_n * r * (1 - r)
            _st(dxg_ptr + g_base + e, d_r, mask, FIX_BF16)
            _st(dxg_ptr + g_base + CHW + e, d_z, mask, FIX_BF16)
            _st(dxg_ptr + g_base + 2 * CHW + e, d_n, mask, FIX_BF16)
            _st(dhg_ptr + g_base + e, d_r, mask, FIX_BF16)
            _st(dhg_ptr + g_base + CHW + e, d_z, mask, FIX_BF16)
            _st(dhg_ptr + g_base + 2 * CHW + e, d_n * r, mask, FIX_BF16)
            _st(dhprev_ptr + s_base + e, dh * z, mask, FIX_BF16)
        tl.debug_barrier()
        _norm_input_grad(dxg_ptr, xp_ptr, gih_ptr, dxp_ptr, g_base, 3 * CHW, HW, mx, rx, BLOCK, IS64, FIX_BF16)
        _norm_input_grad(dhg_ptr, hp_ptr, ghh_ptr, dhp_ptr, g_base, 3 * CHW, HW, mh, rh, BLOCK, IS64, FIX_BF16)

    # ------------------------------------------------------------------------------ op bodies
    def _check_param(fn, name, p, size, ref):
        check_tensor(fn, name, p, 1)
        if p.shape[0] != size or p.device != ref.device:
            raise ValueError(f"{fn}: {name} must be [{size}] on {ref.device}, got {tuple(p.shape)} on {p.device}")

    def _check_step(fn, x_pre, h_pre, c_prev):
        for name, t in (("x_pre", x_pre), ("h_pre", h_pre), ("c_prev", c_prev)):
            check_tensor(fn, name, t, 4)
        B, C, H, W = c_prev.shape
        for name, t in (("x_pre", x_pre), ("h_pre", h_pre)):
            if tuple(t.shape) != (B, 4 * C, H, W) or t.device != c_prev.device:
                raise ValueError(f"{fn}: {name} must be [{B}, {4 * C}, {H}, {W}] on {c_prev.device} (c_prev "
                                 f"{tuple(c_prev.shape)}), got {tuple(t.shape)} on {t.device}")
        return C

    def _params(fn, C, ref, acc, bias, gain_ih, gain_hh, gain_c, bias_c):
        out = []
        for name, p, size in (("bias", bias, 4 * C), ("gain_ih", gain_ih, 4 * C), ("gain_hh", gain_hh, 4 * C),
                              ("gain_c", gain_c, C), ("bias_c", bias_c, C)):
            if p is None:
                out.append(None)
                continue
            _check_param(fn, name, p, size, ref)
            out.append(p.to(acc).contiguous())
        return out

    def _ln_lstm_cell_impl(x_pre: torch.Tensor, h_pre: torch.Tensor, c_prev: torch.Tensor,
                           bias: Optional[torch.Tensor], gain_ih: torch.Tensor, gain_hh: torch.Tensor,
                           gain_c: torch.Tensor, bias_c: torch.Tensor
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "ln_lstm_cell"
        C = _check_step(fn, x_pre, h_pre, c_prev)
        acc = compute_dtype(x_pre.dtype)
        bias, gain_ih, gain_hh, gain_c, bias_c = _params(fn, C, c_prev, acc, bias, gain_ih, gain_hh, gain_c, bias_c)
        x_pre, h_pre, c_prev = x_pre.contiguous(), h_pre.contiguous(), c_prev.to(acc).contiguous()
        B = c_prev.shape[0]
        h = torch.empty(c_prev.shape, dtype=x_pre.dtype, device=c_prev.device)
        c = torch.empty(c_prev.shape, dtype=acc, device=c_prev.device)
        gates = torch.empty_like(x_pre)
        stats = torch.empty((B, 6), dtype=acc, device=c_prev.device)
        if _launch(c_prev.numel(), c_prev):
            with _common.device_guard(c_prev):
                wrap_triton(_ln_lstm_fwd_kernel)[(B,)](
                    x_pre, h_pre, gain_ih if bias is None else bias, gain_ih, gain_hh, gain_c, bias_c, c_prev,
                    h, c, gates, stats, C, c_prev.shape[2] * c_prev.shape[3], EPS,
                    HAS_BIAS=bias is not None, IS64=acc == torch.float64, FIX_BF16=_FIX_BF16, BLOCK=BLOCK_SIZE)
        return h, c, gates, stats

    def _ln_lstm_cell_backward_impl(grad_h: Optional[torch.Tensor], grad_c: Optional[torch.Tensor],
                                    x_pre: torch.Tensor, h_pre: torch.Tensor, c_prev: torch.Tensor,
                                    c: torch.Tensor, gates: torch.Tensor, stats: torch.Tensor,
                                    gain_ih: torch.Tensor, gain_hh: torch.Tensor, gain_c: torch.Tensor,
                                    bias_c: torch.Tensor
                                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "ln_lstm_cell_backward"
        C = _check_step(fn, x_pre, h_pre, c_prev)
        acc = compute_dtype(x_pre.dtype)
        _, gain_ih, gain_hh, gain_c, bias_c = _params(fn, C, c_prev, acc, None, gain_ih, gain_hh, gain_c, bias_c)
        x_pre, h_pre, gates = x_pre.contiguous(), h_pre.contiguous(), gates.contiguous()
        c_prev, c, stats = c_prev.to(acc).contiguous(), c.to(acc).contiguous(), stats.to(acc).contiguous()
        dh = c if grad_h is None else grad_h.contiguous()
        dc = c if grad_c is None else grad_c.contiguous()
        grad_x_pre, grad_h_pre, grad_gates = (torch.empty_like(x_pre) for _ in range(3))
        grad_c_prev = torch.empty_like(c)
        grad_norm_c = torch.empty_like(c)
        B = c.shape[0]
        if _launch(c.numel(), c):
            with _common.device_guard(c):
                wrap_triton(_ln_lstm_bwd_kernel)[(B,)](
                    dh, dc, x_pre, h_pre, c_prev, c, gates, stats, gain_ih, gain_hh, gain_c, bias_c,
                    grad_x_pre, grad_h_pre, grad_c_prev, grad_gates, grad_norm_c, C, c.shape[2] * c.shape[3],
                    HAS_DH=grad_h is not None, HAS_DC=grad_c is not None, IS64=acc == torch.float64,
                    FIX_BF16=_FIX_BF16, BLOCK=BLOCK_SIZE)
        return grad_x_pre, grad_h_pre, grad_c_prev, grad_gates, grad_norm_c

    def _check_gru_step(fn, x_pre, h_pre, h_prev):
        for name, t in (("x_pre", x_pre), ("h_pre", h_pre), ("h_prev", h_prev)):
            check_tensor(fn, name, t, 4)
        B, C, H, W = h_prev.shape
        for name, t in (("x_pre", x_pre), ("h_pre", h_pre)):
            if tuple(t.shape) != (B, 3 * C, H, W) or t.device != h_prev.device:
                raise ValueError(f"{fn}: {name} must be [{B}, {3 * C}, {H}, {W}] on {h_prev.device} (h_prev "
                                 f"{tuple(h_prev.shape)}), got {tuple(t.shape)} on {t.device}")
        return C

    def _gru_params(fn, C, ref, acc, bias_ih, bias_hh, gain_ih, gain_hh):
        out = []
        for name, p in (("bias_ih", bias_ih), ("bias_hh", bias_hh), ("gain_ih", gain_ih), ("gain_hh", gain_hh)):
            if p is not None:
                _check_param(fn, name, p, 3 * C, ref)
            out.append(None if p is None else p.to(acc).contiguous())
        return out

    def _ln_gru_cell_impl(x_pre: torch.Tensor, h_pre: torch.Tensor, h_prev: torch.Tensor,
                          bias_ih: Optional[torch.Tensor], bias_hh: Optional[torch.Tensor], gain_ih: torch.Tensor,
                          gain_hh: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        fn = "ln_gru_cell"
        C = _check_gru_step(fn, x_pre, h_pre, h_prev)
        acc = compute_dtype(x_pre.dtype)
        b_ih, b_hh, g_ih, g_hh = _gru_params(fn, C, h_prev, acc, bias_ih, bias_hh, gain_ih, gain_hh)
        x_pre, h_pre, h_prev = x_pre.contiguous(), h_pre.contiguous(), h_prev.contiguous()
        B = h_prev.shape[0]
        h = torch.empty_like(h_prev)
        stats = torch.empty((B, 4), dtype=acc, device=h_prev.device)
        if _launch(h_prev.numel(), h_prev):
            with _common.device_guard(h_prev):
                wrap_triton(_ln_gru_fwd_kernel)[(B,)](
                    x_pre, h_pre, g_ih if b_ih is None else b_ih, g_ih if b_hh is None else b_hh, g_ih, g_hh, h_prev,
                    h, stats, C, h_prev.shape[2] * h_prev.shape[3], EPS, HAS_BIAS_IH=b_ih is not None,
                    HAS_BIAS_HH=b_hh is not None, IS64=acc == torch.float64, FIX_BF16=_FIX_BF16, BLOCK=BLOCK_SIZE)
        return h, stats

    def _ln_gru_cell_backward_impl(grad_h: torch.Tensor, x_pre: torch.Tensor, h_pre: torch.Tensor,
                                   h_prev: torch.Tensor, stats: torch.Tensor, bias_ih: Optional[torch.Tensor],
                                   bias_hh: Optional[torch.Tensor], gain_ih: torch.Tensor, gain_hh: torch.Tensor
                                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "ln_gru_cell_backward"
        C = _check_gru_step(fn, x_pre, h_pre, h_prev)
        acc = compute_dtype(x_pre.dtype)
        b_ih, b_hh, g_ih, g_hh = _gru_params(fn, C, h_prev, acc, bias_ih, bias_hh, gain_ih, gain_hh)
        grad_h, x_pre, h_pre, h_prev = grad_h.contiguous(), x_pre.contiguous(), h_pre.contiguous(), h_prev.contiguous()
        stats = stats.to(acc).contiguous()
        grad_x_pre, grad_h_pre, grad_xg, grad_hg = (torch.empty_like(x_pre) for _ in range(4))
        grad_h_prev = torch.empty_like(h_prev)
        B = h_prev.shape[0]
        if _launch(h_prev.numel(), h_prev):
            with _common.device_guard(h_prev):
                wrap_triton(_ln_gru_bwd_kernel)[(B,)](
                    grad_h, x_pre, h_pre, h_prev, stats, g_ih if b_ih is None else b_ih,
                    g_ih if b_hh is None else b_hh, g_ih, g_hh, grad_x_pre, grad_h_pre, grad_h_prev, grad_xg, grad_hg,
                    C, h_prev.shape[2] * h_prev.shape[3], HAS_BIAS_IH=b_ih is not None, HAS_BIAS_HH=b_hh is not None,
                    IS64=acc == torch.float64, FIX_BF16=_FIX_BF16, BLOCK=BLOCK_SIZE)
        return grad_x_pre, grad_h_pre, grad_h_prev, grad_xg, grad_hg

    # ------------------------------------------------------------------------------ autograd
    def _setup_context(ctx, inputs, output):
        x_pre, h_pre, c_prev, bias, gain_ih, gain_hh, gain_c, bias_c = inputs
        _, c, gates, stats = output
        ctx.save_for_backward(x_pre, h_pre, c_prev, c, gates, stats, gain_ih, gain_hh, gain_c, bias_c)
        ctx.dtypes = (c_prev.dtype, None if bias is None else bias.dtype)

    def _autograd_backward(ctx, grad_h, grad_c, grad_gates, grad_stats):
        # gates and stats are backward caches: their incoming gradients are ignored.
        x_pre, h_pre, c_prev, c, gates, stats, gain_ih, gain_hh, gain_c, bias_c = ctx.saved_tensors
        if grad_h is None and grad_c is None:
            return (None,) * 8
        d_x, d_h, d_cp, d_a, d_n = torch.ops.fastvid.triton_ln_lstm_cell_backward(
            grad_h, grad_c, x_pre, h_pre, c_prev, c, gates, stats, gain_ih, gain_hh, gain_c, bias_c)
        acc = d_n.dtype
        B = c.shape[0]
        s = stats.to(acc).view(B, 6, 1, 1)
        d_a = d_a.to(acc)
        x_hat = (x_pre.to(acc) - s[:, 0:1]) * s[:, 1:2]
        h_hat = (h_pre.to(acc) - s[:, 2:3]) * s[:, 3:4]
        c_hat = (c.to(acc) - s[:, 4:5]) * s[:, 5:6]
        dims = (0, 2, 3)
        c_prev_dtype, bias_dtype = ctx.dtypes
        grad_bias = None if bias_dtype is None else d_a.sum(dims).to(bias_dtype)
        return (d_x, d_h, d_cp.to(c_prev_dtype), grad_bias, (d_a * x_hat).sum(dims).to(gain_ih.dtype),
                (d_a * h_hat).sum(dims).to(gain_hh.dtype), (d_n * c_hat).sum(dims).to(gain_c.dtype),
                d_n.sum(dims).to(bias_c.dtype))

    def _gru_setup_context(ctx, inputs, output):
        x_pre, h_pre, h_prev, bias_ih, bias_hh, gain_ih, gain_hh = inputs
        ctx.save_for_backward(x_pre, h_pre, h_prev, output[1], bias_ih, bias_hh, gain_ih, gain_hh)

    def _gru_autograd_backward(ctx, grad_h, grad_stats):
        x_pre, h_pre, h_prev, stats, bias_ih, bias_hh, gain_ih, gain_hh = ctx.saved_tensors
        if grad_h is None:
            return (None,) * 7
        d_x, d_h, d_hp, d_xg, d_hg = torch.ops.fastvid.triton_ln_gru_cell_backward(
            grad_h, x_pre, h_pre, h_prev, stats, bias_ih, bias_hh, gain_ih, gain_hh)
        acc = stats.dtype
        s = stats.view(-1, 4, 1, 1)
        d_xg, d_hg = d_xg.to(acc), d_hg.to(acc)
        x_hat = (x_pre.to(acc) - s[:, 0:1]) * s[:, 1:2]
        h_hat = (h_pre.to(acc) - s[:, 2:3]) * s[:, 3:4]
        dims = (0, 2, 3)
        return (d_x, d_h, d_hp, None if bias_ih is None else d_xg.sum(dims).to(bias_ih.dtype),
                None if bias_hh is None else d_hg.sum(dims).to(bias_hh.dtype),
                (d_xg * x_hat).sum(dims).to(gain_ih.dtype), (d_hg * h_hat).sum(dims).to(gain_hh.dtype))

    register_ops((
        ("triton_ln_gru_cell", _ln_gru_cell_impl, _gru_autograd_backward, _gru_setup_context),
        ("triton_ln_gru_cell_backward", _ln_gru_cell_backward_impl, None, None),
        ("triton_ln_lstm_cell", _ln_lstm_cell_impl, _autograd_backward, _setup_context),
        ("triton_ln_lstm_cell_backward", _ln_lstm_cell_backward_impl, None, None),
    ))

    def ln_lstm_cell(x_pre, h_pre, c_prev, bias, gain_ih, gain_hh, gain_c, bias_c):
        """One fused LN-ConvLSTM step from the raw conv outputs; the signature of
        ``fastvid.reference.recurrent_norm.ln_lstm_cell``. Returns ``(h, c)``."""
        h, c, _, _ = torch.ops.fastvid.triton_ln_lstm_cell(x_pre, h_pre, c_prev, bias, gain_ih, gain_hh, gain_c,
                                                           bias_c)
        return h, c

    def ln_gru_cell(x_pre, h_pre, h_prev, bias_ih, bias_hh, gain_ih, gain_hh):
        """One fused LN-ConvGRU step from the raw conv outputs; the signature of
        ``fastvid.reference.recurrent_norm.ln_gru_cell``. Returns ``h``."""
        return torch.ops.fastvid.triton_ln_gru_cell(x_pre, h_pre, h_prev, bias_ih, bias_hh, gain_ih, gain_hh)[0]
