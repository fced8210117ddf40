"""Per-frame 2D CNNs shared by the frame-based models (single frame, late fusion, LRCN, two-stream,
Beyond Short Snippets, VideoLSTM, soft attention). The seed papers use ImageNet CNNs (CaffeNet,
GoogLeNet, VGG); at the sizes these models are built for tests and the CPU training example a small
VGG-style stack stands in, with the width and depth as arguments."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class FrameCNN(nn.Module):
    """VGG-style 2D CNN: for each width a 3×3 conv, BatchNorm, ReLU and a 2×2 max-pool.

    ``forward(x)`` takes frames ``[N, C, H, W]`` and returns the last conv feature map
    ``[N, widths[-1], H / 2^len(widths), W / 2^len(widths)]``; ``pooled(x)`` averages it over space
    (``[N, widths[-1]]``). ``out_channels`` is ``widths[-1]``."""

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        layers = []
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.out_channels = in_channels
        self.min_size = 2 ** len(widths)  # each 2x2 max-pool halves H and W

    def check_frame_size(self, x: Tensor) -> None:
        """Frames of at least 2^len(widths) pixels a side, or a clear error (max-pool's "Output size is too small")."""
        if not torch.jit.is_tracing() and x.dim() == 4 and min(x.shape[2:]) < self.min_size:
            raise ValueError(f"{type(self).__name__}: frames must be at least {self.min_size}x{self.min_size} "
                             f"({len(self.features) // 4} 2x2 max-pools), got {tuple(x.shape[2:])}")

    def forward(self, x: Tensor) -> Tensor:
        self.check_frame_size(x)
        return self.features(x)

    def pooled(self, x: Tensor) -> Tensor:
        return self.forward(x).mean(dim=(2, 3))


def per_frame(module: nn.Module, video: Tensor) -> Tensor:
    """Applies a 2D module to every frame of ``video`` ``[B, C, T, H, W]``; returns ``[B, T, ...]``."""
    B, C, T, H, W = video.shape
    frames = video.transpose(1, 2).reshape(B * T, C, H, W)
    out = module(frames)
    return out.reshape(B, T, *out.shape[1:])


__all__ = ["FrameCNN", "per_frame"]
