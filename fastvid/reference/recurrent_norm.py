"""Layer-normalised ConvLSTM / ConvGRU (``norm="layer"``) in plain PyTorch: the oracle and the fallback.

Layer normalisation after Ba et al. 2016 (LN-LSTM, their eq. 20-22) and haste's LayerNormLSTM,
carried over to conv feature maps. For a ``[B, K, H, W]`` map ``v``::

    LN(v; γ, β)[b, k] = γ[k] · (v[b, k] − μ_b) / sqrt(σ²_b + eps) + β[k]

with μ_b, σ²_b the mean and (biased) variance of sample b over **all** K × H × W values, per-channel
gains γ (init 1) and biases β (init 0), eps = 1e-5. The statistics run over all gate blocks
together, not per gate: Ba et al. normalise the whole 4n-vector W_h h (and W_x x) at once, and
haste's LayerNormLSTM normalises its [4H] input and recurrent pre-activations as one vector each.
Gains are per channel rather than per element so a layer works at any H × W (the conv analogue of
a per-unit gain; the same map as ``F.group_norm(v, 1, γ, β)``).

ConvLSTM (gate order i, f, g, o), with ``*`` the 'same' convolution::

    a = LN(W_ih * x_t; gain_ih) + LN(W_hh * h_{t-1}; gain_hh) + b        (b = bias_ih + bias_hh, [4C])
    i, f, g, o = σ(a_i), σ(a_f), tanh(a_g), σ(a_o)
    c_t = f c_{t-1} + i g                                                 (the state carried on)
    h_t = o tanh(LN(c_t; gain_c, bias_c))

The input and hidden norms have gains only; their additive term is the gate bias b added after
them (as in haste, whose pre-activation norms have no β): a β there would duplicate b.

ConvGRU (gate order r, z, n, the ``nn.GRU`` form, reset_after=True)::

    x_g = LN(W_ih * x_t; gain_ih) + b_ih,  h_g = LN(W_hh * h_{t-1}; gain_hh) + b_hh
    r = σ(x_r + h_r), z = σ(x_z + h_z), n = tanh(x_n + r h_n), h_t = (1 − z) n + z h_{t-1}

Computed in the input dtype (fp32 for bf16/fp16, the LSTM cell state kept in fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .recurrent import compute_dtype

EPS = 1e-5


def layer_norm(v, gain, bias=None, eps=EPS):
    """LN over all but the batch dimension of ``v`` ``[B, K, H, W]``; ``gain``/``bias`` ``[K]``."""
    dims = tuple(range(1, v.dim()))
    mean = v.mean(dim=dims, keepdim=True)
    var = ((v - mean) ** 2).mean(dim=dims, keepdim=True)
    out = (v - mean) / torch.sqrt(var + eps) * gain.to(v.dtype).view(1, -1, 1, 1)
    return out if bias is None else out + bias.to(v.dtype).view(1, -1, 1, 1)


def ln_lstm_cell(x_pre, h_pre, c_prev, bias, gain_ih, gain_hh, gain_c, bias_c):
    """One LN-ConvLSTM step from the raw conv outputs ``x_pre``, ``h_pre`` ``[B, 4C, H, W]`` (no bias).
    Returns ``(h, c)``; ``c`` in the compute dtype."""
    acc = compute_dtype(x_pre.dtype)
    a = layer_norm(x_pre.to(acc), gain_ih) + layer_norm(h_pre.to(acc), gain_hh)
    if bias is not None:
        a = a + bias.to(acc).view(1, -1, 1, 1)
    a_i, a_f, a_g, a_o = a.chunk(4, dim=1)
    c = torch.sigmoid(a_f) * c_prev.to(acc) + torch.sigmoid(a_i) * torch.tanh(a_g)
    h = torch.sigmoid(a_o) * torch.tanh(layer_norm(c, gain_c, bias_c))
    return h.to(x_pre.dtype), c


def convlstm_ln_sequence(x, weight_ih, weight_hh, bias, h0, c0, gain_ih, gain_hh, gain_c, bias_c, padding, dilation,
                         reverse=False, cell=ln_lstm_cell):
    """One LN-ConvLSTM layer over ``x`` ``[B, T, C_in, H, W]``; returns ``(output, h_n, c_n)``.
    ``cell`` computes one step from the raw conv outputs (the Triton backend passes its fused kernel)."""
    h, c = h0, c0
    T = x.shape[1]
    outputs = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        x_pre = F.conv2d(x[:, t], weight_ih, padding=padding, dilation=dilation)
        h_pre = F.conv2d(h, weight_hh, padding=padding, dilation=dilation)
        h, c = cell(x_pre, h_pre, c, bias, gain_ih, gain_hh, gain_c, bias_c)
        outputs[t] = h
    return torch.stack(outputs, dim=1), h, c


def ln_gru_cell(x_pre, h_pre, h_prev, bias_ih, bias_hh, gain_ih, gain_hh):
    """One LN-ConvGRU step (reset_after) from the raw conv outputs ``[B, 3C, H, W]`` (no bias)."""
    acc = compute_dtype(x_pre.dtype)
    x_g = layer_norm(x_pre.to(acc), gain_ih, bias_ih)
    h_g = layer_norm(h_pre.to(acc), gain_hh, bias_hh)
    x_r, x_z, x_n = x_g.chunk(3, dim=1)
    h_r, h_z, h_n = h_g.chunk(3, dim=1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return ((1 - z) * n + z * h_prev.to(acc)).to(h_prev.dtype)


def convgru_ln_sequence(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, gain_ih, gain_hh, padding, dilation,
                        reverse=False, cell=ln_gru_cell):
    """One LN-ConvGRU layer over ``x`` ``[B, T, C_in, H, W]``; returns ``(output, h_n)``."""
    h = h0
    T = x.shape[1]
    outputs = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        x_pre = F.conv2d(x[:, t], weight_ih, padding=padding, dilation=dilation)
        h_pre = F.conv2d(h, weight_hh, padding=padding, dilation=dilation)
        h = cell(x_pre, h_pre, h, bias_ih, bias_hh, gain_ih, gain_hh)
        outputs[t] = h
    return torch.stack(outputs, dim=1), h
