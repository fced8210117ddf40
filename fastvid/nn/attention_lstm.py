"""Convolutional attention LSTM: the recurrent layer of VideoLSTM (Li et al., "VideoLSTM convolves,
attends and flows for action recognition", seed 001).

At every step a two-layer convolutional net scores each position of the input feature map from the
input and the previous hidden state, a spatial softmax turns the scores into an attention map, and
the re-weighted input goes into a ConvLSTM step:

    Z_t = W_z * tanh(W_xa * X_t + W_ha * H_{t-1} + b_a)          [B, 1, H, W]
    A_t = softmax of Z_t over the H·W positions                   (sums to 1 over space)
    X̃_t = A_t ⊙ X_t
    (H_t, C_t) = ConvLSTMCell(X̃_t, (H_{t-1}, C_{t-1}))

Motion-based attention passes ``attention_input`` (e.g. the flow stream's features M_t): W_xa then
reads M_t instead of X_t, while X̃_t still re-weights the appearance features X_t.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._fx import fx_leaf
from .recurrent import ConvLSTMCell, _check_lstm_state


class AttentionConvLSTM(nn.Module):
    """One ConvLSTM layer with spatial soft attention on its input (see the module docstring).

    ``forward(x, attention_input=None, state=None)`` with ``x`` ``[B, T, C_in, H, W]``
    (``batch_first=True``; ``[T, B, ...]`` otherwise) and ``attention_input``
    ``[B, T, attention_in_channels, H, W]`` returns ``(output, (h_n, c_n), attention)``:
    ``output`` ``[B, T, hidden_channels, H, W]``, ``h_n``/``c_n`` ``[B, hidden_channels, H, W]`` and
    the attention maps ``attention`` ``[B, T, H, W]`` (time-major when ``batch_first=False``).

    Parameters: ``input_attention`` (W_xa, b_a), ``hidden_attention`` (W_ha), ``attention_score``
    (W_z), all ``nn.Conv2d`` with ``attention_kernel_size`` kernels (1×1 in the paper), and ``cell``,
    a fastvid ``ConvLSTMCell`` (3×3 in the paper)."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size=3, attention_channels: Optional[int] = None,
                 attention_kernel_size: int = 1, attention_in_channels: Optional[int] = None, bias: bool = True,
                 batch_first: bool = True, peephole: bool = False, unit_forget_bias: bool = True):
        super().__init__()
        if in_channels <= 0 or hidden_channels <= 0:
            raise ValueError(f"in_channels and hidden_channels must be positive, got {in_channels}, {hidden_channels}")
        if attention_kernel_size < 1 or attention_kernel_size % 2 == 0:
            raise ValueError(f"attention_kernel_size must be positive and odd (the map keeps its H x W), got "
                             f"{attention_kernel_size}")
        self.in_channels, self.hidden_channels = in_channels, hidden_channels
        self.attention_channels = hidden_channels if attention_channels is None else attention_channels
        self.attention_in_channels = in_channels if attention_in_channels is None else attention_in_channels
        if self.attention_channels <= 0 or self.attention_in_channels <= 0:  # (0 silently meant the default)
            raise ValueError(f"attention_channels and attention_in_channels must be positive, got "
                             f"{attention_channels}, {attention_in_channels}")
        self.batch_first = batch_first
        pad = attention_kernel_size // 2
        self.input_attention = nn.Conv2d(self.attention_in_channels, self.attention_channels, attention_kernel_size,
                                         padding=pad, bias=True)
        self.hidden_attention = nn.Conv2d(hidden_channels, self.attention_channels, attention_kernel_size,
                                          padding=pad, bias=False)
        self.attention_score = nn.Conv2d(self.attention_channels, 1, attention_kernel_size, padding=pad, bias=False)
        self.cell = ConvLSTMCell(in_channels, hidden_channels, kernel_size, bias=bias, peephole=peephole,
                                 unit_forget_bias=unit_forget_bias)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.hidden_channels}, attention_channels={self.attention_channels}, "
                f"attention_in_channels={self.attention_in_channels}, batch_first={self.batch_first}")

    def forward(self, x: Tensor, attention_input: Optional[Tensor] = None, state: Optional[tuple] = None):
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: one leaf node (nn/_fx.py)
            return fx_leaf(self, x, attention_input, state)
        return attention_convlstm(self, x, attention_input, state)


def attention_convlstm(layer: nn.Module, x: Tensor, attention_input: Optional[Tensor] = None,
                       state: Optional[tuple] = None):
    """The time loop of ``AttentionConvLSTM`` on ``layer``'s submodules (``input_attention``,
    ``hidden_attention``, ``attention_score``, ``cell``): shared with its plain-PyTorch twin, which
    holds the same submodules with a reference ConvLSTM cell."""
    name = type(layer).__name__
    if x.dim() != 5:
        raise ValueError(f"{name}: x must be 5-D [B, T, C, H, W] (batch_first) or [T, B, C, H, W], "
                         f"got {tuple(x.shape)}")
    given, x_given = None if attention_input is None else tuple(attention_input.shape), tuple(x.shape)  # as passed
    if not layer.batch_first:
        x = x.transpose(0, 1)
        attention_input = None if attention_input is None else attention_input.transpose(0, 1)
    B, T, C, H, W = x.shape
    if C != layer.in_channels:
        raise ValueError(f"{name}: x has {C} channels, expected in_channels = {layer.in_channels}")
    if T == 0:
        raise ValueError(f"{name}: x has no time steps (T = 0), got {x_given}")
    source = x if attention_input is None else attention_input
    if source.dim() != 5 or source.shape[:2] != (B, T) or source.shape[3:] != (H, W) \
            or source.shape[2] != layer.attention_in_channels:
        layout = f"[B, T, {layer.attention_in_channels}, {H}, {W}]" if layer.batch_first else \
            f"[T, B, {layer.attention_in_channels}, {H}, {W}]"
        raise ValueError(f"{name}: attention_input must be {layout} (B, T, H, W as x), got {given}")
    hidden = layer.hidden_attention.in_channels
    _check_lstm_state(layer, state)
    for state_name, s in zip("hc", state or ()):  # before W_ha * h reads h (its conv error named no argument)
        batch_one_h = state_name == "h" and isinstance(s, Tensor) and tuple(s.shape) == (1, hidden, H, W)  # (as the cell)
        if not isinstance(s, Tensor) or (tuple(s.shape) != (B, hidden, H, W) and not batch_one_h):
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"{name}: state {state_name} must be [B, C, H, W] = {(B, hidden, H, W)}, got {got}")
    # W_xa * X_t + b_a does not depend on the recurrence: one conv over all B·T frames (channels given: B may be 0).
    input_scores = layer.input_attention(source.reshape(B * T, *source.shape[2:])).reshape(
        B, T, layer.input_attention.out_channels, H, W)
    h, c = state if state is not None else (None, None)
    outputs, maps = [], []
    for t in range(T):
        pre = input_scores[:, t] if h is None else input_scores[:, t] + layer.hidden_attention(h)
        scores = layer.attention_score(torch.tanh(pre))                       # Z_t [B, 1, H, W]
        attention = torch.softmax(scores.flatten(1), dim=1).view(B, 1, H, W)  # A_t
        h, c = layer.cell(attention * x[:, t], None if h is None else (h, c))
        outputs.append(h)
        maps.append(attention[:, 0])
    output, attention_maps = torch.stack(outputs, 1), torch.stack(maps, 1)
    if not layer.batch_first:
        output, attention_maps = output.transpose(0, 1), attention_maps.transpose(0, 1)
    return output, (h, c), attention_maps
