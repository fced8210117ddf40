"""Pure-PyTorch convolutional attention LSTM (VideoLSTM's ALSTM, Li et al., seed 001): the oracle for
``fastvid.nn.AttentionConvLSTM`` and the time loop of its export twin.

Per step, with 'same' zero padding for every convolution (odd kernels):

    Z_t = W_z * tanh(W_xa * M_t + b_a + W_ha * H_{t-1})     [B, 1, H, W]   (M_t = X_t without motion input)
    A_t = exp(Z_t) / Σ_{positions} exp(Z_t)                 spatial softmax
    G_t = W_ih * (A_t ⊙ X_t) + b_ih + W_hh * H_{t-1} + b_hh  [B, 4C, H, W], gates i, f, g, o
    (H_t, C_t) = lstm_cell(G_t, C_{t-1}, peephole)          fastvid.reference.recurrent

H_0 = C_0 = 0 unless given; C is kept in fp32 for bf16/fp16 inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .recurrent import compute_dtype, lstm_cell


def _same(weight):
    return tuple(k // 2 for k in weight.shape[2:])


def attention_convlstm(x, attention_input, w_xa, b_a, w_ha, w_z, weight_ih, weight_hh, bias_ih=None, bias_hh=None,
                       peephole=None, h0=None, c0=None):
    """``x`` ``[B, T, C_in, H, W]``; ``attention_input`` ``[B, T, C_a, H, W]`` or None (then x). Returns
    ``(output [B, T, C, H, W], (h_n, c_n), attention maps [B, T, H, W])``."""
    B, T, _, H, W = x.shape
    C = weight_hh.shape[1]
    source = x if attention_input is None else attention_input
    h = x.new_zeros(B, C, H, W) if h0 is None else h0
    c = x.new_zeros(B, C, H, W, dtype=compute_dtype(x.dtype)) if c0 is None else c0
    outputs, maps = [], []
    for t in range(T):
        pre = F.conv2d(source[:, t], w_xa, b_a, padding=_same(w_xa)) + F.conv2d(h, w_ha, padding=_same(w_ha))
        scores = F.conv2d(torch.tanh(pre), w_z, padding=_same(w_z))
        attention = torch.softmax(scores.reshape(B, H * W), dim=1).reshape(B, 1, H, W)
        gates = (F.conv2d(attention * x[:, t], weight_ih, bias_ih, padding=_same(weight_ih))
                 + F.conv2d(h, weight_hh, bias_hh, padding=_same(weight_hh)))
        h, c, _ = lstm_cell(gates, c, peephole)
        outputs.append(h)
        maps.append(attention[:, 0])
    return torch.stack(outputs, 1), (h, c), torch.stack(maps, 1)
