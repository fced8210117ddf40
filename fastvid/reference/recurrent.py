"""Pure-PyTorch ConvLSTM / ConvGRU: the oracle for tests and the fallback without `_C`.

Written for clarity, not speed. Conventions shared by every backend:

* LSTM gate order i, f, g, o (as ``nn.LSTM``); ``gates_pre`` is ``[B, 4C, H, W]``.
  Optional per-channel peephole weights ``[3, C]`` = (w_ci, w_cf, w_co) after Shi et al. 2015:
  i = σ(a_i + w_ci·c_prev), f = σ(a_f + w_cf·c_prev), c = f·c_prev + i·g,
  o = σ(a_o + w_co·c), h = o·tanh(c).
* GRU gate order r, z, n (as ``nn.GRU``); ``x_gates`` and ``h_gates`` are ``[B, 3C, H, W]``.
  r = σ(x_r + h_r), z = σ(x_z + h_z), h = (1 - z)·n + z·h_prev, and
  reset_after=True  (nn.GRU):        n = tanh(x_n + r·h_n), h_n = W_hn*h + b_hn;
  reset_after=False (Ballas et al.): n = tanh(x_n + h_n),   h_n = U*(r·h_prev) is computed by
  the caller from ``gru_reset_hidden`` = r·h_prev.
* Low-precision inputs (bf16/fp16) are computed in fp32; the LSTM cell state is kept in fp32.
* Variable lengths (``lengths`` ``[B]``, ``pack_padded_sequence`` semantics): sample b takes part in
  time steps t < lengths[b] only. At any other step its state (h, c) stays as it was and its output
  is 0, so h_n / c_n are its state after its last valid step, and the reverse direction, walking
  t = T-1..0, starts from h0 / c0 at t = lengths[b] - 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gate math runs in (and the LSTM cell state is kept in)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lstm_cell(gates_pre, c_prev, peephole=None):
    """Returns ``(h, c, gates)``; ``gates`` are the activated i, f, g, o (the backward cache)."""
    acc = compute_dtype(gates_pre.dtype)
    a_i, a_f, a_g, a_o = gates_pre.to(acc).chunk(4, dim=1)
    c_prev32 = c_prev.to(acc)
    if peephole is not None:
        w_ci, w_cf, w_co = (w.to(acc).view(1, -1, 1, 1) for w in peephole)
        a_i = a_i + w_ci * c_prev32
        a_f = a_f + w_cf * c_prev32
    i, f, g = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.tanh(a_g)
    c = f * c_prev32 + i * g
    if peephole is not None:
        a_o = a_o + w_co * c
    o = torch.sigmoid(a_o)
    h = o * torch.tanh(c)
    gates = torch.cat([i, f, g, o], dim=1)
    return h.to(gates_pre.dtype), c, gates.to(gates_pre.dtype)


def gru_reset_hidden(x_r, h_r, h_prev):
    """r ⊙ h_prev with r = σ(x_r + h_r); all ``[B, C, H, W]``."""
    acc = compute_dtype(h_prev.dtype)
    r = torch.sigmoid(x_r.to(acc) + h_r.to(acc))
    return (r * h_prev.to(acc)).to(h_prev.dtype)


def gru_cell(x_gates, h_gates, h_prev, reset_after=True):
    """Returns ``(h, cache)``; ``cache`` is r, z, n, h_n stacked on channels (the backward cache)."""
    acc = compute_dtype(h_prev.dtype)
    x_r, x_z, x_n = x_gates.to(acc).chunk(3, dim=1)
    h_r, h_z, h_n = h_gates.to(acc).chunk(3, dim=1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n) if reset_after else torch.tanh(x_n + h_n)
    h = (1 - z) * n + z * h_prev.to(acc)
    cache = torch.cat([r, z, n, h_n], dim=1)
    return h.to(h_prev.dtype), cache.to(h_prev.dtype)


def _steps(T, reverse):
    return range(T - 1, -1, -1) if reverse else range(T)


def _valid(lengths, t, like):
    """[B, 1, 1, 1] bool: which samples take part in step t (all without lengths)."""
    if lengths is None:
        return None
    return (lengths.to(like.device) > t).view(-1, 1, 1, 1)


def _masked(valid, new, old):
    """new where the step is valid, else old (state) — or 0 when old is None (output)."""
    if valid is None:
        return new
    return torch.where(valid, new, torch.zeros_like(new) if old is None else old)


def convlstm_sequence(x, weight_ih, weight_hh, bias, h0, c0, peephole, padding, dilation, reverse=False,
                      cell=lstm_cell, lengths=None):
    """One ConvLSTM layer over ``x`` ``[B, T, C_in, H, W]``; returns ``(output, h_n, c_n)``.

    ``cell`` computes the gates (the Triton backend passes its fused kernel); ``lengths``: see above."""
    h, c = h0, c0
    outputs = [None] * x.shape[1]
    for t in _steps(x.shape[1], reverse):
        gates_pre = F.conv2d(x[:, t], weight_ih, bias, padding=padding, dilation=dilation)
        gates_pre = gates_pre + F.conv2d(h, weight_hh, padding=padding, dilation=dilation)
        h_new, c_new, _ = cell(gates_pre, c, peephole)
        valid = _valid(lengths, t, h_new)
        outputs[t] = _masked(valid, h_new, None)
        h, c = _masked(valid, h_new, h), _masked(valid, c_new, c)
    return torch.stack(outputs, dim=1), h, c


def convgru_sequence(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, padding, dilation,
                     reset_after=True, reverse=False, cell=None, reset_hidden=None, lengths=None):
    """One ConvGRU layer over ``x`` ``[B, T, C_in, H, W]``; returns ``(output, h_n)``.

    ``cell`` / ``reset_hidden`` compute the gates (default: this module's gru_cell / gru_reset_hidden);
    ``lengths``: see above."""
    cell = cell or gru_cell
    reset_hidden = reset_hidden or gru_reset_hidden
    C = h0.shape[1]
    h = h0
    outputs = [None] * x.shape[1]
    for t in _steps(x.shape[1], reverse):
        x_gates = F.conv2d(x[:, t], weight_ih, bias_ih, padding=padding, dilation=dilation)
        if reset_after:
            h_gates = F.conv2d(h, weight_hh, bias_hh, padding=padding, dilation=dilation)
        else:
            b_rz = None if bias_hh is None else bias_hh[:2 * C]
            b_n = None if bias_hh is None else bias_hh[2 * C:]
            h_rz = F.conv2d(h, weight_hh[:2 * C], b_rz, padding=padding, dilation=dilation)
            reset_h = reset_hidden(x_gates[:, :C], h_rz[:, :C], h)
            h_n = F.conv2d(reset_h, weight_hh[2 * C:], b_n, padding=padding, dilation=dilation)
            h_gates = torch.cat([h_rz, h_n], dim=1)
        h_new, _ = cell(x_gates, h_gates, h, reset_after)
        valid = _valid(lengths, t, h_new)
        outputs[t] = _masked(valid, h_new, None)
        h = _masked(valid, h_new, h)
    return torch.stack(outputs, dim=1), h
