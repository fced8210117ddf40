"""Triton kernels for the ConvLSTM / ConvGRU gate math, registered as PyTorch ops.

Installed as ``fastvid.triton_kernels.recurrent``. The math, gate orders and dtype conventions are
those of ``fastvid/reference/recurrent.py`` (the oracle); the backward formulas mirror
``csrc/recurrent/recurrent_math.h`` (lstm_backward, gru_backward, gru_reset_backward).

Every kernel is elementwise over one (batch, channel, pixel) cell: a tensor ``[B, G*C, H, W]`` is
flattened to ``N = B*C*H*W`` cells and gate slot ``k`` of cell ``(b, rem)`` (``rem = ch*HW + p``)
lives at ``b*G*C*HW + k*C*HW + rem``. Math runs in fp32 (fp64 when the compute dtype is float64);
results are stored in the output dtype.

Ops (all ``mutates_args=()``; the three forward ops have autograd, the backward ops refuse double
backward):

* ``fastvid::triton_lstm_cell(gates_pre, c_prev, peephole=None) -> (h, c, gates)``
* ``fastvid::triton_lstm_cell_backward(grad_h?, grad_c?, gates, c_prev, c, peephole?)
  -> (grad_gates_pre, grad_c_prev)``
* ``fastvid::triton_gru_cell(x_gates, h_gates, h_prev, reset_after) -> (h, cache)``
* ``fastvid::triton_gru_cell_backward(grad_h, cache, h_prev, reset_after)
  -> (grad_x_gates, grad_h_gates, grad_h_prev)``
* ``fastvid::triton_gru_reset_hidden(x_r, h_r, h_prev) -> reset_h``
* ``fastvid::triton_gru_reset_hidden_backward(grad, x_r, h_r, h_prev) -> (grad_r_pre, grad_h_prev)``

Variable-length sequences (the sequence ops' ``lengths``) use the masked cells, the same kernels with
``HAS_MASK``: sample b takes part in time step ``t`` when ``t < lengths[b]``; otherwise the step is the
identity on its state (output 0, state outputs = previous state, cache 0; backward: no gate gradient,
the state gradients pass straight through). The output and the state are separate outputs.

* ``fastvid::triton_lstm_cell_masked(gates_pre, c_prev, h_prev, lengths, t, peephole=None)
  -> (out, h, c, gates)``
* ``fastvid::triton_lstm_cell_masked_backward(grad_out?, grad_h?, grad_c?, gates, c_prev, c, lengths, t,
  peephole?) -> (grad_gates_pre, grad_c_prev, grad_h_prev)``
* ``fastvid::triton_gru_cell_masked(x_gates, h_gates, h_prev, lengths, t, reset_after) -> (out, h, cache)``
* ``fastvid::triton_gru_cell_masked_backward(grad_out?, grad_h?, cache, h_prev, lengths, t, reset_after)
  -> (grad_x_gates, grad_h_gates, grad_h_prev)``

Without Triton the module still imports, with ``AVAILABLE = False`` and none of the above defined.

Interpreter notes (``TRITON_INTERPRET=1``, CPU tensors: bf16 rounding, no launch on fake tensors,
ops opaque under functionalization) are in ``_common.py``.
"""
from typing import Optional, Tuple

import torch

from fastvid.reference.recurrent import compute_dtype

from ._common import AVAILABLE, tl, triton

__all__ = [
    "AVAILABLE",
    "BLOCK_SIZE",
    "lstm_cell",
    "lstm_cell_backward",
    "gru_cell",
    "gru_cell_backward",
    "gru_reset_hidden",
    "gru_reset_hidden_backward",
    "lstm_cell_masked",
    "gru_cell_masked",
]

# Elements per program. Module-level so tests can shrink it to exercise many programs.
BLOCK_SIZE = 1024

if AVAILABLE:
    from torch.library import wrap_triton  # bare name: torch's kernel discovery looks for it

    from . import _common
    from ._common import FIX_BF16 as _FIX_BF16
    from ._common import check_tensor, ld as _ld, register_ops, should_launch, st as _st

    # ------------------------------------------------------------------------------ helpers
    @triton.jit
    def _sigmoid(x):
        # Overflow-free: e = exp(-|x|) <= 1.
        e = tl.exp(-tl.abs(x))
        r = 1 / (1 + e)
        return tl.where(x >= 0, r, e * r)

    @triton.jit
    def _tanh(x):
        # Overflow-free: tanh(|x|) = (1 - e) / (1 + e), e = exp(-2|x|) <= 1.
        e = tl.exp(-2 * tl.abs(x))
        t = (1 - e) / (1 + e)
        return tl.where(x >= 0, t, -t)

    @triton.jit
    def _cell_index(N, C, HW, BLOCK: tl.constexpr):
        """Flat cell offsets of this program, their mask, batch b, rem = ch*HW + p, and C*HW, all
        int64: G*C*HW passes 2^31 at 2^29 cells per sample for G = 4 gates."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        CHW = tl.cast(C, tl.int64) * HW
        b = offs // CHW
        rem = offs - b * CHW  # ch * HW + p
        return offs, mask, b, rem, CHW

    @triton.jit
    def _step_valid(len_ptr, b, t, mask):
        """Whether sample b takes part in time step t (t < lengths[b])."""
        return tl.load(len_ptr + b, mask=mask, other=0) > t

    # ------------------------------------------------------------------------------ kernels
    @triton.jit
    def _lstm_cell_fwd_kernel(gp_ptr, cp_ptr, w_ptr, h_ptr, c_ptr, gates_ptr, len_ptr, hp_ptr, hs_ptr, t,
                              N, C, HW, HAS_PEEP: tl.constexpr, HAS_MASK: tl.constexpr, IS64: tl.constexpr,
                              FIX_BF16: tl.constexpr, BLOCK: tl.constexpr):
        # HAS_MASK: h_ptr receives the output (0 for masked samples), hs_ptr the state.
        offs, mask, b, rem, CHW = _cell_index(N, C, HW, BLOCK)
        g0 = b * (4 * CHW) + rem
        a_i = _ld(gp_ptr + g0, mask, IS64)
        a_f = _ld(gp_ptr + g0 + CHW, mask, IS64)
        a_g = _ld(gp_ptr + g0 + 2 * CHW, mask, IS64)
        a_o = _ld(gp_ptr + g0 + 3 * CHW, mask, IS64)
        c_prev = _ld(cp_ptr + offs, mask, IS64)
        ch = rem // HW
        if HAS_PEEP:
            a_i += _ld(w_ptr + ch, mask, IS64) * c_prev
            a_f += _ld(w_ptr + C + ch, mask, IS64) * c_prev
        i = _sigmoid(a_i)
        f = _sigmoid(a_f)
        g = _tanh(a_g)
        c = f * c_prev + i * g
        if HAS_PEEP:
            a_o += _ld(w_ptr + 2 * C + ch, mask, IS64) * c
        o = _sigmoid(a_o)
        h = o * _tanh(c)
        if HAS_MASK:
            valid = _step_valid(len_ptr, b, t, mask)
            _st(hs_ptr + offs, tl.where(valid, h, _ld(hp_ptr + offs, mask, IS64)), mask, FIX_BF16)
            h = tl.where(valid, h, 0.0)
            c = tl.where(valid, c, c_prev)
            i = tl.where(valid, i, 0.0)
            f = tl.where(valid, f, 0.0)
            g = tl.where(valid, g, 0.0)
            o = tl.where(valid, o, 0.0)
        _st(h_ptr + offs, h, mask, FIX_BF16)
        _st(c_ptr + offs, c, mask, FIX_BF16)
        _st(gates_ptr + g0, i, mask, FIX_BF16)
        _st(gates_ptr + g0 + CHW, f, mask, FIX_BF16)
        _st(gates_ptr + g0 + 2 * CHW, g, mask, FIX_BF16)
        _st(gates_ptr + g0 + 3 * CHW, o, mask, FIX_BF16)

    @triton.jit
    def _lstm_cell_bwd_kernel(dh_ptr, dc_ptr, gates_ptr, cp_ptr, c_ptr, w_ptr, dg_ptr, dcp_ptr,
                              len_ptr, dhs_ptr, dhp_ptr, t, N, C, HW, HAS_DH: tl.constexpr, HAS_DC: tl.constexpr,
                              HAS_PEEP: tl.constexpr, HAS_MASK: tl.constexpr, IS64: tl.constexpr,
                              FIX_BF16: tl.constexpr, BLOCK: tl.constexpr):
        # HAS_MASK: dh_ptr is the output's gradient (HAS_DH), dhs_ptr the state's; dhp_ptr receives
        # the state gradient masked samples pass to h_prev (0 for the others).
        offs, mask, b, rem, CHW = _cell_index(N, C, HW, BLOCK)
        g0 = b * (4 * CHW) + rem
        i = _ld(gates_ptr + g0, mask, IS64)
        f = _ld(gates_ptr + g0 + CHW, mask, IS64)
        g = _ld(gates_ptr + g0 + 2 * CHW, mask, IS64)
        o = _ld(gates_ptr + g0 + 3 * CHW, mask, IS64)
        c_prev = _ld(cp_ptr + offs, mask, IS64)
        c = _ld(c_ptr + offs, mask, IS64)
        tanh_c = _tanh(c)
        # dc_total = dc + dh·o·(1 − tanh²c) + d a_o·w_co   (lstm_backward)
        dc_total = tl.zeros_like(c)
        d_ao = tl.zeros_like(c)
        if HAS_DC:
            dc_total = _ld(dc_ptr + offs, mask, IS64)
        dc_in = dc_total
        if HAS_MASK:
            dh_state = _ld(dhs_ptr + offs, mask, IS64)
            dh = dh_state
            if HAS_DH:
                dh = dh + _ld(dh_ptr + offs, mask, IS64)
            d_ao = dh * tanh_c * o * (1 - o)
            dc_total = dc_total + dh * o * (1 - tanh_c * tanh_c)
        elif HAS_DH:
            dh = _ld(dh_ptr + offs, mask, IS64)
            d_ao = dh * tanh_c * o * (1 - o)
            dc_total = dc_total + dh * o * (1 - tanh_c * tanh_c)
        ch = rem // HW
        if HAS_PEEP:
            dc_total = dc_total + d_ao * _ld(w_ptr + 2 * C + ch, mask, IS64)
        d_ai = dc_total * g * i * (1 - i)
        d_ag = dc_total * i * (1 - g * g)
        d_af = dc_total * c_prev * f * (1 - f)
        d_cp = dc_total * f
        if HAS_PEEP:
            d_cp = d_cp + d_ai * _ld(w_ptr + ch, mask, IS64) + d_af * _ld(w_ptr + C + ch, mask, IS64)
        if HAS_MASK:
            valid = _step_valid(len_ptr, b, t, mask)
            d_ai = tl.where(valid, d_ai, 0.0)
            d_af = tl.where(valid, d_af, 0.0)
            d_ag = tl.where(valid, d_ag, 0.0)
            d_ao = tl.where(valid, d_ao, 0.0)
            d_cp = tl.where(valid, d_cp, dc_in)
            _st(dhp_ptr + offs, tl.where(valid, 0.0, dh_state), mask, FIX_BF16)
        _st(dg_ptr + g0, d_ai, mask, FIX_BF16)
        _st(dg_ptr + g0 + CHW, d_af, mask, FIX_BF16)
        _st(dg_ptr + g0 + 2 * CHW, d_ag, mask, FIX_BF16)
        _st(dg_ptr + g0 + 3 * CHW, d_ao, mask, FIX_BF16)
        _st(dcp_ptr + offs, d_cp, mask, FIX_BF16)

    @triton.jit
    def _gru_cell_fwd_kernel(xg_ptr, hg_ptr, hp_ptr, h_ptr, cache_ptr, len_ptr, hs_ptr, t, N, C, HW,
                             RESET_AFTER: tl.constexpr, HAS_MASK: tl.constexpr, IS64: tl.constexpr,
                             FIX_BF16: tl.constexpr, BLOCK: tl.constexpr):
        # HAS_MASK: h_ptr receives the output (0 for masked samples), hs_ptr the state.
        offs, mask, b, rem, CHW = _cell_index(N, C, HW, BLOCK)
        g3 = b * (3 * CHW) + rem
        g4 = b * (4 * CHW) + rem
        x_r = _ld(xg_ptr + g3, mask, IS64)
        x_z = _ld(xg_ptr + g3 + CHW, mask, IS64)
        x_n = _ld(xg_ptr + g3 + 2 * CHW, mask, IS64)
        h_r = _ld(hg_ptr + g3, mask, IS64)
        h_z = _ld(hg_ptr + g3 + CHW, mask, IS64)
        h_n = _ld(hg_ptr + g3 + 2 * CHW, mask, IS64)
        h_prev = _ld(hp_ptr + offs, mask, IS64)
        r = _sigmoid(x_r + h_r)
        z = _sigmoid(x_z + h_z)
        if RESET_AFTER:
            n = _tanh(x_n + r * h_n)
        else:
            n = _tanh(x_n + h_n)
        h = (1 - z) * n + z * h_prev
        if HAS_MASK:
            valid = _step_valid(len_ptr, b, t, mask)
            _st(hs_ptr + offs, tl.where(valid, h, h_prev), mask, FIX_BF16)
            h = tl.where(valid, h, 0.0)
            r = tl.where(valid, r, 0.0)
            z = tl.where(valid, z, 0.0)
            n = tl.where(valid, n, 0.0)
            h_n = tl.where(valid, h_n, 0.0)
        _st(h_ptr + offs, h, mask, FIX_BF16)
        _st(cache_ptr + g4, r, mask, FIX_BF16)
        _st(cache_ptr + g4 + CHW, z, mask, FIX_BF16)
        _st(cache_ptr + g4 + 2 * CHW, n, mask, FIX_BF16)
        _st(cache_ptr + g4 + 3 * CHW, h_n, mask, FIX_BF16)

    @triton.jit
    def _gru_cell_bwd_kernel(dh_ptr, cache_ptr, hp_ptr, dx_ptr, dhg_ptr, dhp_ptr, len_ptr, dhs_ptr, t, N, C, HW,
                             RESET_AFTER: tl.constexpr, HAS_MASK: tl.constexpr, IS64: tl.constexpr,
                             FIX_BF16: tl.constexpr, BLOCK: tl.constexpr):
        # HAS_MASK: dh_ptr is the output's gradient, dhs_ptr the state's.
        offs, mask, b, rem, CHW = _cell_index(N, C, HW, BLOCK)
        g3 = b * (3 * CHW) + rem
        g4 = b * (4 * CHW) + rem
        dh = _ld(dh_ptr + offs, mask, IS64)
        if HAS_MASK:
            dh_state = _ld(dhs_ptr + offs, mask, IS64)
            dh = dh + dh_state
        r = _ld(cache_ptr + g4, mask, IS64)
        z = _ld(cache_ptr + g4 + CHW, mask, IS64)
        n = _ld(cache_ptr + g4 + 2 * CHW, mask, IS64)
        h_n = _ld(cache_ptr + g4 + 3 * CHW, mask, IS64)
        h_prev = _ld(hp_ptr + offs, mask, IS64)
        dn_pre = dh * (1 - z) * (1 - n * n)
        d_z = dh * (h_prev - n) * z * (1 - z)
        if RESET_AFTER:
            d_hn = dn_pre * r
            d_r = dn_pre * h_n * r * (1 - r)
        else:
            d_hn = dn_pre
            d_r = tl.zeros_like(dn_pre)  # r's gradient comes from the reset stage
        d_hp = dh * z
        if HAS_MASK:
            valid = _step_valid(len_ptr, b, t, mask)
            d_r = tl.where(valid, d_r, 0.0)
            d_z = tl.where(valid, d_z, 0.0)
            dn_pre = tl.where(valid, dn_pre, 0.0)
            d_hn = tl.where(valid, d_hn, 0.0)
            d_hp = tl.where(valid, d_hp, dh_state)
        _st(dx_ptr + g3, d_r, mask, FIX_BF16)
        _st(dx_ptr + g3 + CHW, d_z, mask, FIX_BF16)
        _st(dx_ptr + g3 + 2 * CHW, dn_pre, mask, FIX_BF16)
        _st(dhg_ptr + g3, d_r, mask, FIX_BF16)
        _st(dhg_ptr + g3 + CHW, d_z, mask, FIX_BF16)
        _st(dhg_ptr + g3 + 2 * CHW, d_hn, mask, FIX_BF16)
        _st(dhp_ptr + offs, d_hp, mask, FIX_BF16)

    @triton.jit
    def _gru_reset_fwd_kernel(xr_ptr, hr_ptr, hp_ptr, out_ptr, N,
                              IS64: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        r = _sigmoid(_ld(xr_ptr + offs, mask, IS64) + _ld(hr_ptr + offs, mask, IS64))
        _st(out_ptr + offs, r * _ld(hp_ptr + offs, mask, IS64), mask, FIX_BF16)

    @triton.jit
    def _gru_reset_bwd_kernel(d_ptr, xr_ptr, hr_ptr, hp_ptr, dr_ptr, dhp_ptr, N,
                              IS64: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        d = _ld(d_ptr + offs, mask, IS64)
        h_prev = _ld(hp_ptr + offs, mask, IS64)
        r = _sigmoid(_ld(xr_ptr + offs, mask, IS64) + _ld(hr_ptr + offs, mask, IS64))
        _st(dhp_ptr + offs, d * r, mask, FIX_BF16)
        _st(dr_ptr + offs, d * h_prev * r * (1 - r), mask, FIX_BF16)

    # ------------------------------------------------------------------------------ validation
    def _check_tensor(fn, name, t, rank=4):
        check_tensor(fn, name, t, rank)

    def _check_like(fn, ref_name, ref, name, t, channels, same_dtype=False):
        """``t`` [B, channels, H, W] on ``ref``'s device with ``ref``'s batch and spatial dims (and its dtype
        with same_dtype: the GRU ops, whose operands the C++ kernels also take in one dtype; an LSTM's cell
        state may be fp32 beside bf16 gates)."""
        _check_tensor(fn, name, t)
        if t.device != ref.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}")
        if same_dtype and t.dtype != ref.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
        if t.shape[0] != ref.shape[0] or t.shape[2:] != ref.shape[2:]:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(t.shape)}, incompatible with {ref_name} "
                f"{tuple(ref.shape)} (batch and spatial dims must match)")
        if t.shape[1] != channels:
            raise ValueError(
                f"{fn}: {name} must have {channels} channels (C = {ref.shape[1]} from {ref_name}), "
                f"got {t.shape[1]}")

    def _check_peephole(fn, peephole, ref):
        if peephole is None:
            return
        _check_tensor(fn, "peephole", peephole, rank=2)
        if peephole.device != ref.device:
            raise ValueError(f"{fn}: peephole is on {peephole.device} but c_prev is on {ref.device}")
        if tuple(peephole.shape) != (3, ref.shape[1]):
            raise ValueError(
                f"{fn}: peephole must have shape (3, C) = (3, {ref.shape[1]}), got {tuple(peephole.shape)}")

    def _grid(n):
        return (triton.cdiv(n, BLOCK_SIZE),)

    _launch = should_launch

    # ------------------------------------------------------------------------------ op bodies
    def _lstm_cell_impl(gates_pre: torch.Tensor, c_prev: torch.Tensor,
                        peephole: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "lstm_cell"
        _check_tensor(fn, "c_prev", c_prev)
        C = c_prev.shape[1]
        _check_like(fn, "c_prev", c_prev, "gates_pre", gates_pre, 4 * C)
        _check_peephole(fn, peephole, c_prev)
        gates_pre, c_prev = gates_pre.contiguous(), c_prev.contiguous()
        acc = compute_dtype(gates_pre.dtype)
        h = torch.empty(c_prev.shape, dtype=gates_pre.dtype, device=c_prev.device)
        c = torch.empty(c_prev.shape, dtype=acc, device=c_prev.device)
        gates = torch.empty_like(gates_pre)
        w = gates_pre if peephole is None else peephole.contiguous()
        N = c_prev.numel()
        if _launch(N, c_prev):
            HW = c_prev.shape[2] * c_prev.shape[3]
            with _common.device_guard(c_prev):
                wrap_triton(_lstm_cell_fwd_kernel)[_grid(N)](
                    gates_pre, c_prev, w, h, c, gates, c_prev, c_prev, h, 0, N, C, HW,
                    HAS_PEEP=peephole is not None, HAS_MASK=False, IS64=acc == torch.float64, FIX_BF16=_FIX_BF16,
                    BLOCK=BLOCK_SIZE)
        return h, c, gates

    def _lstm_cell_backward_impl(grad_h: Optional[torch.Tensor], grad_c: Optional[torch.Tensor],
                                 gates: torch.Tensor, c_prev: torch.Tensor, c: torch.Tensor,
                                 peephole: Optional[torch.Tensor] = None
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        fn = "lstm_cell_backward"
        _check_tensor(fn, "c_prev", c_prev)
        C = c_prev.shape[1]
        _check_like(fn, "c_prev", c_prev, "gates", gates, 4 * C)
        _check_like(fn, "c_prev", c_prev, "c", c, C)
        if grad_h is not None:
            _check_like(fn, "c_prev", c_prev, "grad_h", grad_h, C)
        if grad_c is not None:
            _check_like(fn, "c_prev", c_prev, "grad_c", grad_c, C)
        _check_peephole(fn, peephole, c_prev)
        gates, c_prev, c = gates.contiguous(), c_prev.contiguous(), c.contiguous()
        dh = gates if grad_h is None else grad_h.contiguous()
        dc = gates if grad_c is None else grad_c.contiguous()
        w = gates if peephole is None else peephole.contiguous()
        acc = compute_dtype(gates.dtype)
        grad_gates_pre = torch.empty_like(gates)
        grad_c_prev = torch.empty_like(c_prev)
        N = c_prev.numel()
        if _launch(N, c_prev):
            HW = c_prev.shape[2] * c_prev.shape[3]
            with _common.device_guard(c_prev):
                wrap_triton(_lstm_cell_bwd_kernel)[_grid(N)](
                    dh, dc, gates, c_prev, c, w, grad_gates_pre, grad_c_prev, c_prev, c_prev, grad_c_prev, 0,
                    N, C, HW, HAS_DH=grad_h is not None, HAS_DC=grad_c is not None,
                    HAS_PEEP=peephole is not None, HAS_MASK=False, IS64=acc == torch.float64, FIX_BF16=_FIX_BF16,
                    BLOCK=BLOCK_SIZE)
        return grad_gates_pre, grad_c_prev

    def _gru_cell_impl(x_gates: torch.Tensor, h_gates: torch.Tensor, h_prev: torch.Tensor,
                       reset_after: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        fn = "gru_cell"
        _check_tensor(fn, "h_prev", h_prev)
        C = h_prev.shape[1]
        _check_like(fn, "h_prev", h_prev, "x_gates", x_gates, 3 * C, same_dtype=True)
        _check_like(fn, "h_prev", h_prev, "h_gates", h_gates, 3 * C, same_dtype=True)
        x_gates, h_gates, h_prev = x_gates.contiguous(), h_gates.contiguous(), h_prev.contiguous()
        acc = compute_dtype(h_prev.dtype)
        h = torch.empty_like(h_prev)
        B, _, H, W = h_prev.shape
        cache = torch.empty((B, 4 * C, H, W), dtype=h_prev.dtype, device=h_prev.device)
        N = h_prev.numel()
        if _launch(N, h_prev):
            with _common.device_guard(h_prev):
                wrap_triton(_gru_cell_fwd_kernel)[_grid(N)](
                    x_gates, h_gates, h_prev, h, cache, h_prev, h, 0, N, C, H * W,
                    RESET_AFTER=bool(reset_after), HAS_MASK=False, IS64=acc == torch.float64, FIX_BF16=_FIX_BF16,
                    BLOCK=BLOCK_SIZE)
        return h, cache

    def _gru_cell_backward_impl(grad_h: torch.Tensor, cache: torch.Tensor, h_prev: torch.Tensor,
                                reset_after: bool
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "gru_cell_backward"
        _check_tensor(fn, "h_prev", h_prev)
        C = h_prev.shape[1]
        _check_like(fn, "h_prev", h_prev, "grad_h", grad_h, C, same_dtype=True)
        _check_like(fn, "h_prev", h_prev, "cache", cache, 4 * C, same_dtype=True)
        grad_h, cache, h_prev = grad_h.contiguous(), cache.contiguous(), h_prev.contiguous()
        acc = compute_dtype(cache.dtype)
        B, _, H, W = h_prev.shape
        grad_x = torch.empty((B, 3 * C, H, W), dtype=cache.dtype, device=h_prev.device)
        grad_hg = torch.empty_like(grad_x)
        grad_h_prev = torch.empty_like(h_prev)
        N = h_prev.numel()
        if _launch(N, h_prev):
            with _common.device_guard(h_prev):
                wrap_triton(_gru_cell_bwd_kernel)[_grid(N)](
                    grad_h, cache, h_prev, grad_x, grad_hg, grad_h_prev, h_prev, h_prev, 0, N, C, H * W,
                    RESET_AFTER=bool(reset_after), HAS_MASK=False, IS64=acc == torch.float64, FIX_BF16=_FIX_BF16,
                    BLOCK=BLOCK_SIZE)
        return grad_x, grad_hg, grad_h_prev

    def _gru_reset_hidden_impl(x_r: torch.Tensor, h_r: torch.Tensor,
                               h_prev: torch.Tensor) -> torch.Tensor:
        fn = "gru_reset_hidden"
        _check_tensor(fn, "h_prev", h_prev)
        C = h_prev.shape[1]
        _check_like(fn, "h_prev", h_prev, "x_r", x_r, C, same_dtype=True)
        _check_like(fn, "h_prev", h_prev, "h_r", h_r, C, same_dtype=True)
        x_r, h_r, h_prev = x_r.contiguous(), h_r.contiguous(), h_prev.contiguous()
        acc = compute_dtype(h_prev.dtype)
        out = torch.empty_like(h_prev)
        N = h_prev.numel()
        if _launch(N, h_prev):
            with _common.device_guard(h_prev):
                wrap_triton(_gru_reset_fwd_kernel)[_grid(N)](
                    x_r, h_r, h_prev, out, N,
                    IS64=acc == torch.float64, FIX_BF16=_FIX_BF16, BLOCK=BLOCK_SIZE)
        return out

    def _gru_reset_hidden_backward_impl(grad: torch.Tensor, x_r: torch.Tensor, h_r: torch.Tensor,
                                        h_prev: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        fn = "gru_reset_hidden_backward"
        _check_tensor(fn, "h_prev", h_prev)
        C = h_prev.shape[1]
        _check_like(fn, "h_prev", h_prev, "grad", grad, C, same_dtype=True)
        _check_like(fn, "h_prev", h_prev, "x_r", x_r, C, same_dtype=True)
        _check_like(fn, "h_prev", h_prev, "h_r", h_r, C, same_dtype=True)
        grad, x_r, h_r, h_prev = grad.contiguous(), x_r.contiguous(), h_r.contiguous(), h_prev.contiguous()
        acc = compute_dtype(h_prev.dtype)
        grad_r_pre = torch.empty_like(x_r)
        grad_h_prev = torch.empty_like(h_prev)
        N = h_prev.numel()
        if _launch(N, h_prev):
            with _common.device_guard(h_prev):
                wrap_triton(_gru_reset_bwd_kernel)[_grid(N)](
                    grad, x_r, h_r, h_prev, grad_r_pre, grad_h_prev, N,
                    IS64=acc == torch.float64, FIX_BF16=_FIX_BF16, BLOCK=BLOCK_SIZE)
        return grad_r_pre, grad_h_prev

    # ------------------------------------------------------------------------------ masked cells
    def _check_lengths(fn, lengths, ref):
        """lengths: [B] int64 on ref's device (the sequence op converted and checked its values)."""
        if not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.int64 or lengths.dim() != 1:
            raise ValueError(f"{fn}: lengths must be a 1-D int64 tensor")
        if lengths.shape[0] != ref.shape[0] or lengths.device != ref.device:
            raise ValueError(f"{fn}: lengths must be [B] = [{ref.shape[0]}] on {ref.device}, got "
                             f"{tuple(lengths.shape)} on {lengths.device}")

    def _lstm_cell_masked_impl(gates_pre: torch.Tensor, c_prev: torch.Tensor, h_prev: torch.Tensor,
                               lengths: torch.Tensor, t: int, peephole: Optional[torch.Tensor] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "lstm_cell_masked"
        _check_tensor(fn, "c_prev", c_prev)
        C = c_prev.shape[1]
        _check_like(fn, "c_prev", c_prev, "gates_pre", gates_pre, 4 * C)
        _check_like(fn, "c_prev", c_prev, "h_prev", h_prev, C)
        _check_peephole(fn, peephole, c_prev)
        _check_lengths(fn, lengths, c_prev)
        gates_pre, c_prev, h_prev = gates_pre.contiguous(), c_prev.contiguous(), h_prev.contiguous()
        acc = compute_dtype(gates_pre.dtype)
        out = torch.empty(c_prev.shape, dtype=gates_pre.dtype, device=c_prev.device)
        h = torch.empty_like(out)
        c = torch.empty(c_prev.shape, dtype=acc, device=c_prev.device)
        gates = torch.empty_like(gates_pre)
        w = gates_pre if peephole is None else peephole.contiguous()
        N = c_prev.numel()
        if _launch(N, c_prev):
            with _common.device_guard(c_prev):
                wrap_triton(_lstm_cell_fwd_kernel)[_grid(N)](
                    gates_pre, c_prev, w, out, c, gates, lengths, h_prev, h, t, N, C,
                    c_prev.shape[2] * c_prev.shape[3], HAS_PEEP=peephole is not None, HAS_MASK=True,
                    IS64=acc == torch.float64, FIX_BF16=_FIX_BF16, BLOCK=BLOCK_SIZE)
        return out, h, c, gates

    def _lstm_cell_masked_backward_impl(grad_out: Optional[torch.Tensor], grad_h: Optional[torch.Tensor],
                                        grad_c: Optional[torch.Tensor], gates: torch.Tensor, c_prev: torch.Tensor,
                                        c: torch.Tensor, lengths: torch.Tensor, t: int,
                                        peephole: Optional[torch.Tensor] = None
                                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "lstm_cell_masked_backward"
        _check_tensor(fn, "c_prev", c_prev)
        C = c_prev.shape[1]
        _check_like(fn, "c_prev", c_prev, "gates", gates, 4 * C)
        _check_like(fn, "c_prev", c_prev, "c", c, C)
        for name, g in (("grad_out", grad_out), ("grad_h", grad_h), ("grad_c", grad_c)):
            if g is not None:
                _check_like(fn, "c_prev", c_prev, name, g, C)
        _check_peephole(fn, peephole, c_prev)
        _check_lengths(fn, lengths, c_prev)
        gates, c_prev, c = gates.contiguous(), c_prev.contiguous(), c.contiguous()
        d_out = gates if grad_out is None else grad_out.contiguous()
        d_state = torch.zeros(c_prev.shape, dtype=gates.dtype, device=c_prev.device) if grad_h is None \
            else grad_h.contiguous()
        dc = gates if grad_c is None else grad_c.contiguous()
        w = gates if peephole is None else peephole.contiguous()
        acc = compute_dtype(gates.dtype)
        grad_gates_pre = torch.empty_like(gates)
        grad_c_prev = torch.empty_like(c_prev)
        grad_h_prev = torch.empty(c_prev.shape, dtype=gates.dtype, device=c_prev.device)
        N = c_prev.numel()
        if _launch(N, c_prev):
            with _common.device_guard(c_prev):
                wrap_triton(_lstm_cell_bwd_kernel)[_grid(N)](
                    d_out, dc, gates, c_prev, c, w, grad_gates_pre, grad_c_prev, lengths, d_state, grad_h_prev, t,
                    N, C, c_prev.shape[2] * c_prev.shape[3], HAS_DH=grad_out is not None, HAS_DC=grad_c is not None,
                    HAS_PEEP=peephole is not None, HAS_MASK=True, IS64=acc == torch.float64, FIX_BF16=_FIX_BF16,
                    BLOCK=BLOCK_SIZE)
        return grad_gates_pre, grad_c_prev, grad_h_prev

    def _gru_cell_masked_impl(x_gates: torch.Tensor, h_gates: torch.Tensor, h_prev: torch.Tensor,
                              lengths: torch.Tensor, t: int, reset_after: bool
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "gru_cell_masked"
        _check_tensor(fn, "h_prev", h_prev)
        C = h_prev.shape[1]
        _check_like(fn, "h_prev", h_prev, "x_gates", x_gates, 3 * C, same_dtype=True)
        _check_like(fn, "h_prev", h_prev, "h_gates", h_gates, 3 * C, same_dtype=True)
        _check_lengths(fn, lengths, h_prev)
        x_gates, h_gates, h_prev = x_gates.contiguous(), h_gates.contiguous(), h_prev.contiguous()
        acc = compute_dtype(h_prev.dtype)
        out, h = torch.empty_like(h_prev), torch.empty_like(h_prev)
        B, _, H, W = h_prev.shape
        cache = torch.empty((B, 4 * C, H, W), dtype=h_prev.dtype, device=h_prev.device)
        N = h_prev.numel()
        if _launch(N, h_prev):
            with _common.device_guard(h_prev):
                wrap_triton(_gru_cell_fwd_kernel)[_grid(N)](
                    x_gates, h_gates, h_prev, out, cache, lengths, h, t, N, C, H * W,
                    RESET_AFTER=bool(reset_after), HAS_MASK=True, IS64=acc == torch.float64, FIX_BF16=_FIX_BF16,
                    BLOCK=BLOCK_SIZE)
        return out, h, cache

    def _gru_cell_masked_backward_impl(grad_out: Optional[torch.Tensor], grad_h: Optional[torch.Tensor],
                                       cache: torch.Tensor, h_prev: torch.Tensor, lengths: torch.Tensor, t: int,
                                       reset_after: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "gru_cell_masked_backward"
        _check_tensor(fn, "h_prev", h_prev)
        C = h_prev.shape[1]
        for name, g in (("grad_out", grad_out), ("grad_h", grad_h)):
            if g is not None:
                _check_like(fn, "h_prev", h_prev, name, g, C, same_dtype=True)
        _check_like(fn, "h_prev", h_prev, "cache", cache, 4 * C, same_dtype=True)
        _check_lengths(fn, lengths, h_prev)
        cache, h_prev = cache.contiguous(), h_prev.contiguous()
        d_out = torch.zeros_like(h_prev) if grad_out is None else grad_out.contiguous()
        d_state = torch.zeros_like(h_prev) if grad_h is None else grad_h.contiguous()
        acc = compute_dtype(cache.dtype)
        B, _, H, W = h_prev.shape
        grad_x = torch.empty((B, 3 * C, H, W), dtype=cache.dtype, device=h_prev.device)
        grad_hg = torch.empty_like(grad_x)
        grad_h_prev = torch.empty_like(h_prev)
        N = h_prev.numel()
        if _launch(N, h_prev):
            with _common.device_guard(h_prev):
                wrap_triton(_gru_cell_bwd_kernel)[_grid(N)](
                    d_out, cache, h_prev, grad_x, grad_hg, grad_h_prev, lengths, d_state, t, N, C, H * W,
                    RESET_AFTER=bool(reset_after), HAS_MASK=True, IS64=acc == torch.float64, FIX_BF16=_FIX_BF16,
                    BLOCK=BLOCK_SIZE)
        return grad_x, grad_hg, grad_h_prev

    # ------------------------------------------------------------------------------ autograd
    def _lstm_cell_setup_context(ctx, inputs, output):
        _, c_prev, peephole = inputs
        _, c, gates = output
        ctx.save_for_backward(gates, c_prev, c, peephole)

    def _lstm_cell_autograd_backward(ctx, grad_h, grad_c, grad_gates):
        # ``gates`` is the backward cache: its incoming gradient is ignored.
        gates, c_prev, c, peephole = ctx.saved_tensors
        if grad_h is None and grad_c is None:
            return None, None, None
        grad_gates_pre, grad_c_prev = torch.ops.fastvid.triton_lstm_cell_backward(
            grad_h, grad_c, gates, c_prev, c, peephole)
        grad_peephole = None
        if peephole is not None and ctx.needs_input_grad[2]:
            acc = compute_dtype(gates.dtype)
            B, C = c.shape[0], c.shape[1]
            d = grad_gates_pre.reshape(B, 4, C, -1).to(acc)
            cp = c_prev.reshape(B, C, -1).to(acc)
            cc = c.reshape(B, C, -1).to(acc)
            grad_peephole = torch.stack([
                (d[:, 0] * cp).sum(dim=(0, 2)),
                (d[:, 1] * cp).sum(dim=(0, 2)),
                (d[:, 3] * cc).sum(dim=(0, 2)),
            ]).to(peephole.dtype)
        return grad_gates_pre, grad_c_prev, grad_peephole

    def _gru_cell_setup_context(ctx, inputs, output):
        x_gates, h_gates, h_prev, reset_after = inputs
        ctx.save_for_backward(output[1], h_prev)
        ctx.reset_after = bool(reset_after)
        ctx.gate_dtypes = (x_gates.dtype, h_gates.dtype)

    def _gru_cell_autograd_backward(ctx, grad_h, grad_cache):
        # ``cache`` is the backward cache: its incoming gradient is ignored.
        cache, h_prev = ctx.saved_tensors
        if grad_h is None:
            return None, None, None, None
        grad_x, grad_hg, grad_h_prev = torch.ops.fastvid.triton_gru_cell_backward(
            grad_h, cache, h_prev, ctx.reset_after)
        x_dtype, h_dtype = ctx.gate_dtypes
        return grad_x.to(x_dtype), grad_hg.to(h_dtype), grad_h_prev, None

    def _gru_reset_hidden_setup_context(ctx, inputs, output):
        x_r, h_r, h_prev = inputs
        ctx.save_for_backward(x_r, h_r, h_prev)

    def _gru_reset_hidden_autograd_backward(ctx, grad):
        x_r, h_r, h_prev = ctx.saved_tensors
        if grad is None:
            return None, None, None
        grad_r_pre, grad_h_prev = torch.ops.fastvid.triton_gru_reset_hidden_backward(
            grad, x_r, h_r, h_prev)
        return grad_r_pre, grad_r_pre.to(h_r.dtype), grad_h_prev

    def _lstm_cell_masked_setup_context(ctx, inputs, output):
        _, c_prev, _, lengths, t, peephole = inputs
        _, _, c, gates = output
        ctx.save_for_backward(gates, c_prev, c, lengths, peephole)
        ctx.t = t

    def _lstm_cell_masked_autograd_backward(ctx, grad_out, grad_h, grad_c, grad_gates):
        gates, c_prev, c, lengths, peephole = ctx.saved_tensors
        grad_gates_pre, grad_c_prev, grad_h_prev = torch.ops.fastvid.triton_lstm_cell_masked_backward(
            grad_out, grad_h, grad_c, gates, c_prev, c, lengths, ctx.t, peephole)
        grad_peephole = None
        if peephole is not None and ctx.needs_input_grad[5]:
            acc = compute_dtype(gates.dtype)
            B, C = c.shape[0], c.shape[1]
            d = grad_gates_pre.reshape(B, 4, C, -1).to(acc)
            cp, cc = c_prev.reshape(B, C, -1).to(acc), c.reshape(B, C, -1).to(acc)
            grad_peephole = torch.stack([(d[:, 0] * cp).sum(dim=(0, 2)), (d[:, 1] * cp).sum(dim=(0, 2)),
                                         (d[:, 3] * cc).sum(dim=(0, 2))]).to(peephole.dtype)
        return grad_gates_pre, grad_c_prev, grad_h_prev, None, None, grad_peephole

    def _gru_cell_masked_setup_context(ctx, inputs, output):
        x_gates, h_gates, h_prev, lengths, t, reset_after = inputs
        ctx.save_for_backward(output[2], h_prev, lengths)
        ctx.t, ctx.reset_after = t, bool(reset_after)
        ctx.gate_dtypes = (x_gates.dtype, h_gates.dtype)

    def _gru_cell_masked_autograd_backward(ctx, grad_out, grad_h, grad_cache):
        cache, h_prev, lengths = ctx.saved_tensors
        grad_x, grad_hg, grad_h_prev = torch.ops.fastvid.triton_gru_cell_masked_backward(
            grad_out, grad_h, cache, h_prev, lengths, ctx.t, ctx.reset_after)
        x_dtype, h_dtype = ctx.gate_dtypes
        return grad_x.to(x_dtype), grad_hg.to(h_dtype), grad_h_prev, None, None, None

    # ------------------------------------------------------------------------------ registration
    _OPS = (
        ("triton_lstm_cell", _lstm_cell_impl,
         _lstm_cell_autograd_backward, _lstm_cell_setup_context),
        ("triton_lstm_cell_backward", _lstm_cell_backward_impl, None, None),
        ("triton_gru_cell", _gru_cell_impl,
         _gru_cell_autograd_backward, _gru_cell_setup_context),
        ("triton_gru_cell_backward", _gru_cell_backward_impl, None, None),
        ("triton_gru_reset_hidden", _gru_reset_hidden_impl,
         _gru_reset_hidden_autograd_backward, _gru_reset_hidden_setup_context),
        ("triton_gru_reset_hidden_backward", _gru_reset_hidden_backward_impl, None, None),
        ("triton_lstm_cell_masked", _lstm_cell_masked_impl,
         _lstm_cell_masked_autograd_backward, _lstm_cell_masked_setup_context),
        ("triton_lstm_cell_masked_backward", _lstm_cell_masked_backward_impl, None, None),
        ("triton_gru_cell_masked", _gru_cell_masked_impl,
         _gru_cell_masked_autograd_backward, _gru_cell_masked_setup_context),
        ("triton_gru_cell_masked_backward", _gru_cell_masked_backward_impl, None, None),
    )
    register_ops(_OPS)

    # ------------------------------------------------------------------------------ public API
    def lstm_cell(gates_pre, c_prev, peephole=None):
        """Fused LSTM cell. Returns ``(h, c, gates)``: h in gates_pre.dtype, c in
        ``compute_dtype(gates_pre.dtype)``, gates = activated i, f, g, o in gates_pre.dtype."""
        return torch.ops.fastvid.triton_lstm_cell(gates_pre, c_prev, peephole)

    def lstm_cell_backward(grad_h, grad_c, gates, c_prev, c, peephole=None):
        """Returns ``(grad_gates_pre, grad_c_prev)``; grad_h / grad_c may be None (zero)."""
        return torch.ops.fastvid.triton_lstm_cell_backward(grad_h, grad_c, gates, c_prev, c, peephole)

    def gru_cell(x_gates, h_gates, h_prev, reset_after=True):
        """Fused GRU cell. Returns ``(h, cache)``; cache = r, z, n, h_n ``[B, 4C, H, W]``."""
        return torch.ops.fastvid.triton_gru_cell(x_gates, h_gates, h_prev, bool(reset_after))

    def gru_cell_backward(grad_h, cache, h_prev, reset_after=True):
        """Returns ``(grad_x_gates, grad_h_gates, grad_h_prev)``; r slots are 0 unless reset_after."""
        return torch.ops.fastvid.triton_gru_cell_backward(grad_h, cache, h_prev, bool(reset_after))

    def gru_reset_hidden(x_r, h_r, h_prev):
        """σ(x_r + h_r)·h_prev, all ``[B, C, H, W]``, in h_prev.dtype."""
        return torch.ops.fastvid.triton_gru_reset_hidden(x_r, h_r, h_prev)

    def gru_reset_hidden_backward(grad, x_r, h_r, h_prev):
        """Returns ``(grad_r_pre, grad_h_prev)``; grad_r_pre in x_r.dtype."""
        return torch.ops.fastvid.triton_gru_reset_hidden_backward(grad, x_r, h_r, h_prev)

    def lstm_cell_masked(gates_pre, c_prev, h_prev, lengths, t, peephole=None):
        """One step t of a variable-length sequence: ``(out, h, c, gates)``; samples with
        ``lengths[b] <= t`` get out = 0, h = h_prev, c = c_prev. lengths: [B] int64 on the device."""
        return torch.ops.fastvid.triton_lstm_cell_masked(gates_pre, c_prev, h_prev, lengths, int(t), peephole)

    def gru_cell_masked(x_gates, h_gates, h_prev, lengths, t, reset_after=True):
        """One step t of a variable-length sequence: ``(out, h, cache)``; samples with
        ``lengths[b] <= t`` get out = 0, h = h_prev."""
        return torch.ops.fastvid.triton_gru_cell_masked(x_gates, h_gates, h_prev, lengths, int(t), bool(reset_after))
