"""R(2+1)D-18 (Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action Recognition",
CVPR 2018): an 18-layer 3D ResNet whose every t×d×d convolution is factorised into a 1×d×d spatial
convolution to M channels, BatchNorm, ReLU and a t×1×1 temporal convolution (``fastvid.nn.Conv2Plus1d``),
with M chosen so the factorised block has the parameters of the full one
(``fastvid.nn.r2plus1d_mid_channels``). Videos are ``[B, C, T, H, W]``.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..nn import Conv2Plus1d, r2plus1d_mid_channels
from ._registry import register

MID_CHANNEL_RULES = ("torchvision", "per_conv")


class BasicBlock2Plus1d(nn.Module):
    """Two (2+1)D 3×3×3 convolutions with BN/ReLU and a residual connection.
    ``[B, in, T, H, W] -> [B, out, T / s, H / s, W / s]`` (stride s in time and space).

    ``mid_channels_rule``: ``"torchvision"`` sizes both convolutions' M from the block's (in, out)
    widths, as torchvision's ``r2plus1d_18`` does (its 31,505,325 parameters); ``"per_conv"`` applies
    the formula to each convolution's own widths (the paper's wording)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, mid_channels_rule: str = "torchvision"):
        super().__init__()
        if mid_channels_rule not in MID_CHANNEL_RULES:
            raise ValueError(f"mid_channels_rule must be one of {MID_CHANNEL_RULES}, got {mid_channels_rule!r}")
        mid_first = r2plus1d_mid_channels(in_channels, out_channels, 3)
        mid_second = mid_first if mid_channels_rule == "torchvision" else r2plus1d_mid_channels(out_channels,
                                                                                               out_channels, 3)
        self.conv1 = Conv2Plus1d(in_channels, out_channels, 3, stride=stride, mid_channels=mid_first)
        self.norm1 = nn.BatchNorm3d(out_channels)
        self.conv2 = Conv2Plus1d(out_channels, out_channels, 3, mid_channels=mid_second)
        self.norm2 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm3d(out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class R2Plus1d(nn.Module):
    """R(2+1)D ResNet. ``forward(video [B, 3, T, H, W]) -> [B, num_classes]``.

    Stem: 1×7×7 conv stride (1, 2, 2) to 45 channels, BN, ReLU, 3×1×1 conv to 64, BN, ReLU. Four
    stages of ``BasicBlock2Plus1d`` at widths w, 2w, 4w, 8w (w = 64), the last three starting with
    stride 2 in time and space; global average pool; linear. T/8 and H, W/16 at the last stage."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3, stage_blocks: Sequence[int] = (2, 2, 2, 2),
                 base_channels: int = 64, stem_mid_channels: int = 45, mid_channels_rule: str = "torchvision"):
        super().__init__()
        self.stem = nn.Sequential(
            Conv2Plus1d(in_channels, base_channels, (3, 7, 7), stride=(1, 2, 2), mid_channels=stem_mid_channels),
            nn.BatchNorm3d(base_channels),
            nn.ReLU(inplace=True))
        stages, channels = [], base_channels
        for index, blocks in enumerate(stage_blocks):
            width = base_channels * 2 ** index
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(*[
                BasicBlock2Plus1d(channels if block == 0 else width, width, stride if block == 0 else 1,
                                  mid_channels_rule)
                for block in range(blocks)]))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.out_features = channels

    def features(self, video: Tensor) -> Tensor:
        return self.stages(self.stem(video))

    def forward(self, video: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(video)).flatten(1))


@register("r2plus1d_18")
def r2plus1d_18(num_classes: int = 400, in_channels: int = 3, frames: int = 16, height: int = 112,
                width: int = 112, base_channels: int = 64, stage_blocks: Sequence[int] = (2, 2, 2, 2),
                mid_channels_rule: str = "torchvision") -> R2Plus1d:
    """R(2+1)D-18 on 16-frame 112² clips (the clip size torchvision's Kinetics-400 weights use; any
    size with T ≥ 1 and H, W ≥ 16 runs, the head pools globally). With 400 classes and the defaults it
    has torchvision ``r2plus1d_18``'s 31,505,325 parameters. ``base_channels`` and ``stage_blocks``
    shrink it for tests (the stem's 45 mid channels scale with ``base_channels / 64``)."""
    stem_mid = max(1, round(45 * base_channels / 64))
    return R2Plus1d(num_classes, in_channels, stage_blocks, base_channels, stem_mid, mid_channels_rule)


__all__ = ["BasicBlock2Plus1d", "R2Plus1d", "r2plus1d_18"]
