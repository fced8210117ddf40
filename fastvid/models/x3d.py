"""X3D (Feichtenhofer, "X3D: Expanding Architectures for Efficient Video Recognition", CVPR 2020):
a ResNet of inverted bottlenecks whose 3×3×3 convolutions are channel-wise (``fastvid.nn.DepthwiseConv3d``).

X3D-S and X3D-M share every width and depth; they differ only in the input they are built for:
X3D-S 13 frames at 160², X3D-M 16 frames at 224². Videos are ``[B, C, T, H, W]``.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..nn import DepthwiseConv3d
from ._registry import register
from .resnet3d import shortcut

X3D_WIDTHS = (24, 48, 96, 192)
X3D_DEPTHS = (3, 5, 11, 7)


def round_width(width: float, divisor: int = 8, min_width: int = 8) -> int:
    """Nearest multiple of ``divisor`` (at least ``min_width``), rounded up when rounding down would
    lose more than 10 % — the channel rounding of the X3D reference code (SE widths: 54/16 → 8)."""
    rounded = max(min_width, int(width + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * width:
        rounded += divisor
    return int(rounded)


class SqueezeExcitation3d(nn.Module):
    """Channel gating (Hu et al.): global average pool, 1×1×1 conv to ``reduced`` channels, ReLU,
    1×1×1 conv back, sigmoid, multiply. ``[B, C, T, H, W] -> [B, C, T, H, W]``."""

    def __init__(self, channels: int, reduced_channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.reduce = nn.Conv3d(channels, reduced_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv3d(reduced_channels, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class X3DBlock(nn.Module):
    """X3D residual block: 1×1×1 conv to ``inner`` channels, BN, ReLU; 3×3×3 depthwise conv (spatial
    stride s), BN, optional SE, Swish; 1×1×1 conv to ``out``, BN; add the (projected) input; ReLU.
    ``[B, in, T, H, W] -> [B, out, T, H / s, W / s]``."""

    def __init__(self, in_channels: int, inner_channels: int, out_channels: int, spatial_stride: int = 1,
                 se_ratio: float = 0.0):
        super().__init__()
        self.conv_a = nn.Conv3d(in_channels, inner_channels, 1, bias=False)
        self.norm_a = nn.BatchNorm3d(inner_channels)
        self.conv_b = DepthwiseConv3d(inner_channels, 3, stride=(1, spatial_stride, spatial_stride), padding=1,
                                      bias=False)
        self.norm_b = nn.BatchNorm3d(inner_channels)
        self.se = (SqueezeExcitation3d(inner_channels, round_width(inner_channels * se_ratio)) if se_ratio > 0
                   else nn.Identity())
        self.swish = nn.SiLU()
        self.conv_c = nn.Conv3d(inner_channels, out_channels, 1, bias=False)
        self.norm_c = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_channels, out_channels, spatial_stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.norm_a(self.conv_a(x)))
        y = self.swish(self.se(self.norm_b(self.conv_b(y))))
        y = self.norm_c(self.conv_c(y))
        return self.relu(y + self.shortcut(x))


class X3D(nn.Module):
    """X3D network. ``forward(video [B, 3, T, H, W]) -> [B, num_classes]``.

    Stem: 1×3×3 conv 3 → 24, stride (1, 2, 2), then a 5×1×1 depthwise conv, BN, ReLU. Stages res2–res5
    of ``X3DBlock`` at widths 24/48/96/192 with inner width ×2.25 (54/108/216/432), 3/5/11/7 blocks,
    spatial stride 2 at each stage's first block (no temporal stride: T is kept), SE (1/16) on every
    other block starting with the first. Head: 1×1×1 conv 192 → 432, BN, ReLU, global average pool,
    1×1×1 conv 432 → 2048, ReLU, dropout, linear. H, W / 32 at res5."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3, widths: Sequence[int] = X3D_WIDTHS,
                 depths: Sequence[int] = X3D_DEPTHS, bottleneck_factor: float = 2.25, se_ratio: float = 1 / 16,
                 head_width: int = 2048, dropout: float = 0.5):
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"X3D: widths {widths} and depths {depths} must have one entry per stage")
        stem_width = widths[0]
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, stem_width, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
            DepthwiseConv3d(stem_width, (5, 1, 1), padding=(2, 0, 0), bias=False),
            nn.BatchNorm3d(stem_width),
            nn.ReLU(inplace=True))
        stages, channels = [], stem_width
        for width, depth in zip(widths, depths):
            inner = int(bottleneck_factor * width)
            stages.append(nn.Sequential(*[
                X3DBlock(channels if index == 0 else width, inner, width, spatial_stride=2 if index == 0 else 1,
                         se_ratio=se_ratio if index % 2 == 0 else 0.0)
                for index in range(depth)]))
            channels = width
        self.stages = nn.Sequential(*stages)
        head_inner = int(bottleneck_factor * channels)
        self.head = nn.Sequential(
            nn.Conv3d(channels, head_inner, 1, bias=False),
            nn.BatchNorm3d(head_inner),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool3d(1),
            nn.Conv3d(head_inner, head_width, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Flatten(1),
            nn.Dropout(dropout),
            nn.Linear(head_width, num_classes))
        self.out_features = head_width

    def features(self, video: Tensor) -> Tensor:
        """res5 output ``[B, widths[-1], T, H/32, W/32]``."""
        return self.stages(self.stem(video))

    def forward(self, video: Tensor) -> Tensor:
        return self.head(self.features(video))


_X3D_DOC = """{name}: {frames} frames at {size}² (Feichtenhofer 2020). Widths/depths as ``X3D``; about 3.8 M
    parameters with 400 classes. ``frames``/``height``/``width`` give the input the model is built for
    (any T ≥ 1, H, W ≥ 32 runs: the head pools globally). ``widths``, ``depths`` and ``head_width``
    shrink the network for tests."""


@register("x3d_s")
def x3d_s(num_classes: int = 400, in_channels: int = 3, frames: int = 13, height: int = 160, width: int = 160,
          widths: Sequence[int] = X3D_WIDTHS, depths: Sequence[int] = X3D_DEPTHS, head_width: int = 2048,
          dropout: float = 0.5) -> X3D:
    return X3D(num_classes, in_channels, widths, depths, head_width=head_width, dropout=dropout)


@register("x3d_m")
def x3d_m(num_classes: int = 400, in_channels: int = 3, frames: int = 16, height: int = 224, width: int = 224,
          widths: Sequence[int] = X3D_WIDTHS, depths: Sequence[int] = X3D_DEPTHS, head_width: int = 2048,
          dropout: float = 0.5) -> X3D:
    return X3D(num_classes, in_channels, widths, depths, head_width=head_width, dropout=dropout)


x3d_s.__doc__ = _X3D_DOC.format(name="X3D-S", frames=13, size=160)
x3d_m.__doc__ = _X3D_DOC.format(name="X3D-M", frames=16, size=224)

__all__ = ["round_width", "SqueezeExcitation3d", "X3DBlock", "X3D", "x3d_s", "x3d_m"]
