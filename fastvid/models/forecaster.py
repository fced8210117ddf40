"""``convlstm_forecaster`` — the encoder-forecaster of Shi et al., "Convolutional LSTM Network: A
Machine Learning Approach for Precipitation Nowcasting", NIPS 2015.

An encoder of stacked ConvLSTM layers reads the observed frames; a forecaster of as many ConvLSTM
layers, layer k starting from encoder layer k's final (h, c), unrolls for the future frames; the
outputs of all forecaster layers, concatenated, go through a 1×1 convolution to the predicted frames.
As in the paper the forecaster sees no input frames: its first layer reads a zero map, so every
future frame comes from the copied states alone. Also as in the paper, ``patch_size`` p > 1 folds
each p×p patch into channels (``pixel_unshuffle``) so the recurrent layers run at H/p × W/p.

Each layer is one fastvid ``ConvLSTM`` call (the fused sequence op: the time loop runs in C++ or
the Triton/CUDA kernels), not a Python loop over steps.

Input ``[B, C, T_in, H, W]``; output the predicted frames ``[B, C, future_frames, H, W]`` as
probabilities (sigmoid), for targets in [0, 1] such as the moving digits
(fastvid/models/moving_digits.py); ``forward(..., logits=True)`` returns the pre-sigmoid values
(for ``binary_cross_entropy_with_logits``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ConvLSTM
from ._registry import register
from .recurrent import check_video


class ConvLSTMForecaster(nn.Module):
    def __init__(self, in_channels: int = 1, hidden_channels: Sequence[int] = (16, 16), kernel_size: int = 3,
                 future_frames: int = 10, patch_size: int = 2):
        super().__init__()
        if not hidden_channels or any(c < 1 for c in hidden_channels):
            raise ValueError(f"hidden_channels must be a non-empty list of positive widths, got {hidden_channels}")
        if future_frames < 1 or patch_size < 1:
            raise ValueError(f"future_frames and patch_size must be >= 1, got {future_frames}, {patch_size}")
        self.in_channels, self.future_frames, self.patch_size = in_channels, future_frames, patch_size
        self.hidden_channels = list(hidden_channels)
        patch_channels = in_channels * patch_size ** 2
        below = [patch_channels] + self.hidden_channels[:-1]
        self.encoder = nn.ModuleList(ConvLSTM(c_in, c, kernel_size) for c_in, c in zip(below, self.hidden_channels))
        # forecaster layer 0 reads a 1-channel zero map (no input), layer k > 0 the layer below
        self.forecaster = nn.ModuleList(ConvLSTM(c_in, c, kernel_size)
                                        for c_in, c in zip([1] + self.hidden_channels[:-1], self.hidden_channels))
        self.output = nn.Conv2d(sum(self.hidden_channels), patch_channels, 1)

    def forward(self, video: Tensor, future_frames: Optional[int] = None, logits: bool = False) -> Tensor:
        check_video(self, video, self.in_channels)
        B, _, _, H, W = video.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"{type(self).__name__}: frame size {H}x{W} is not a multiple of patch_size {p}")
        future = self.future_frames if future_frames is None else future_frames
        frames = video.transpose(1, 2)  # [B, T, C, H, W], ConvLSTM's batch_first layout
        x = F.pixel_unshuffle(frames, p) if p > 1 else frames
        states = []
        for layer in self.encoder:
            x, (h_n, c_n) = layer(x)
            states.append((h_n, c_n))
        x = x.new_zeros(B, future, 1, H // p, W // p)
        outputs = []
        for layer, state in zip(self.forecaster, states):
            x, _ = layer(x, state)
            outputs.append(x)
        stacked = torch.cat(outputs, dim=2).flatten(0, 1)  # [B·future, ΣC, H/p, W/p]
        predicted = self.output(stacked)
        predicted = F.pixel_shuffle(predicted, p) if p > 1 else predicted
        predicted = predicted.view(B, future, self.in_channels, H, W).transpose(1, 2)
        return predicted if logits else torch.sigmoid(predicted)


@register("convlstm_forecaster")
def convlstm_forecaster(in_channels: int = 1, hidden_channels: Sequence[int] = (16, 16), kernel_size: int = 3,
                        future_frames: int = 10, patch_size: int = 2) -> ConvLSTMForecaster:
    """Shi et al. 2015's encoder-forecaster. The defaults are small enough to train on a CPU in about a
    minute (``python -m fastvid train --task predict``); the paper's Moving MNIST model is
    ``hidden_channels=(256, 128, 128), kernel_size=5, patch_size=4`` on 64×64 frames, 10 → 10 frames."""
    return ConvLSTMForecaster(in_channels, hidden_channels, kernel_size, future_frames, patch_size)


__all__ = ["ConvLSTMForecaster", "convlstm_forecaster"]
