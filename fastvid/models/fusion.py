"""Single-frame, late-, early- and slow-fusion video classifiers: the small example architectures of
the "Early Fusion vs Late Fusion vs 3D CNN" table in seed 003 (Karpathy et al., "Large-scale Video
Classification with Convolutional Neural Networks", CVPR 2014), on ``3 × 20 × 64 × 64`` input:

==============  ====================  =================  =====================
model           layer                 size (C×T×H×W)     receptive field T×H×W
==============  ====================  =================  =====================
late fusion     Conv2D(3×3, 3→12)     12 × 20 × 64 × 64  1 × 3 × 3
                Pool2D(4×4)           12 × 20 × 16 × 16  1 × 6 × 6
                Conv2D(3×3, 12→24)    24 × 20 × 16 × 16  1 × 14 × 14
                GlobalAvgPool         24 × 1 × 1 × 1     20 × 64 × 64
early fusion    Conv2D(3×3, 3·20→12)  12 × 64 × 64       20 × 3 × 3
                Pool2D(4×4)           12 × 16 × 16       20 × 6 × 6
                Conv2D(3×3, 12→24)    24 × 16 × 16       20 × 14 × 14
                GlobalAvgPool         24 × 1 × 1         20 × 64 × 64
3D CNN (slow)   Conv3D(3×3×3, 3→12)   12 × 20 × 64 × 64  3 × 3 × 3
                Pool3D(4×4×4)         12 × 5 × 16 × 16   6 × 6 × 6
                Conv3D(3×3×3, 12→24)  24 × 5 × 16 × 16   14 × 14 × 14
                GlobalAvgPool         24 × 1 × 1 × 1     20 × 64 × 64
==============  ====================  =================  =====================

(The slide writes the early-fusion conv as "3*10→12"; with T = 20 frames and a temporal receptive
field of 20 it takes all 3·20 channels.) The table lists convs and pools only. Here each conv is
followed by BatchNorm (``batch_norm=True``, the default: it changes no size or receptive field and
lets these tiny nets train reliably from scratch) and a ReLU; pools are max pools (as in Karpathy et
al.); convs are padded to keep the size; a linear classifier follows the global pool. Every layer
of the table is a named submodule (``conv1``, ``pool1``, ``conv2``, ``global_pool``) so its output
can be inspected with hooks.

``single_frame`` runs the late-fusion 2D CNN on every frame with a per-frame classifier and averages
the class probabilities over frames (seed 003: "train normal 2D CNN to classify video frames
independently"); ``late_fusion(head="fc")`` flattens the frame features of all frames (``T·D·H'·W'``)
into an MLP (seed 003, "Late Fusion (with FC layers)").
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ._registry import register
from .backbones import per_frame


def conv_block(conv: nn.Module, batch_norm: bool) -> nn.Sequential:
    """One conv row of the table: ``conv`` → BatchNorm (if ``batch_norm``) → ReLU. BatchNorm changes
    neither the sizes nor the receptive fields; it makes these tiny nets train reliably."""
    norm_class = nn.BatchNorm3d if isinstance(conv, nn.Conv3d) else nn.BatchNorm2d
    norm = norm_class(conv.out_channels) if batch_norm else nn.Identity()
    return nn.Sequential(conv, norm, nn.ReLU(inplace=True))


class PerFrame(nn.Module):
    """Applies a 2D module to every frame: ``[B, C, T, H, W]`` → ``[B, C', T, H', W']``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, video: Tensor) -> Tensor:
        return per_frame(self.module, video).transpose(1, 2)


class TableFrameCNN(nn.Module):
    """The 2D CNN of the table's late-fusion rows, run on each frame:
    Conv2D(3×3, in→c1) + ReLU, Pool2D(4×4), Conv2D(3×3, c1→c2) + ReLU (each conv with BatchNorm
    before the ReLU if ``batch_norm``).

    ``forward(video)``: ``[B, C, T, H, W]`` → ``[B, c2, T, H/4, W/4]``."""

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (12, 24), batch_norm: bool = True):
        super().__init__()
        first, second = channels
        self.conv1 = PerFrame(conv_block(nn.Conv2d(in_channels, first, 3, padding=1), batch_norm))
        self.pool1 = PerFrame(nn.MaxPool2d(4))
        self.conv2 = PerFrame(conv_block(nn.Conv2d(first, second, 3, padding=1), batch_norm))
        self.out_channels = second

    def forward(self, video: Tensor) -> Tensor:
        return self.conv2(self.pool1(self.conv1(video)))


class SingleFrame(nn.Module):
    """Single-frame CNN (seed 003): the table's 2D CNN and a linear classifier on every frame
    independently; the class probabilities are averaged over the ``T`` frames.

    ``forward(video [B, C, T, H, W])`` returns ``log(mean_t softmax(scores_t))`` ``[B, num_classes]``:
    log-probabilities, so ``cross_entropy`` on them is the negative log of the averaged
    probability of the true class and their argmax is the averaged prediction."""

    def __init__(self, num_classes: int, in_channels: int = 3, channels: Sequence[int] = (12, 24),
                 batch_norm: bool = True):
        super().__init__()
        self.features = TableFrameCNN(in_channels, channels, batch_norm)
        self.classifier = nn.Linear(self.features.out_channels, num_classes)

    def forward(self, video: Tensor) -> Tensor:
        frame_features = self.features(video).mean(dim=(3, 4)).transpose(1, 2)  # [B, T, D]
        frame_log_probs = torch.log_softmax(self.classifier(frame_features), dim=-1)  # [B, T, K]
        frames = frame_log_probs.shape[1]
        return torch.logsumexp(frame_log_probs, dim=1) - math.log(frames)


class LateFusion(nn.Module):
    """Late fusion (seed 003): the table's 2D CNN on each frame, then

    - ``head="pool"``: average over space and time (``GlobalAvgPool``, 24 × 1 × 1 × 1) → linear;
    - ``head="fc"``: the frame features of all frames flattened (``T·D·H'·W'``, in frame order) →
      MLP (linear → ReLU → dropout → linear); sized for ``frames × height × width`` input.

    ``forward(video [B, C, T, H, W])`` → class scores ``[B, num_classes]``."""

    def __init__(self, num_classes: int, head: str = "pool", in_channels: int = 3,
                 channels: Sequence[int] = (12, 24), batch_norm: bool = True, frames: int = 20,
                 height: int = 64, width: int = 64, hidden_features: int = 256, dropout: float = 0.5):
        super().__init__()
        if head not in ("pool", "fc"):
            raise ValueError(f"late_fusion: head must be 'pool' or 'fc', got {head!r}")
        self.head = head
        self.features = TableFrameCNN(in_channels, channels, batch_norm)
        feature_channels = self.features.out_channels
        if head == "pool":
            self.global_pool = nn.AdaptiveAvgPool3d(1)
            self.classifier = nn.Linear(feature_channels, num_classes)
        else:
            self.built_for = (frames, height, width)
            flat = feature_channels * frames * (height // 4) * (width // 4)
            self.classifier = nn.Sequential(nn.Linear(flat, hidden_features), nn.ReLU(inplace=True),
                                            nn.Dropout(dropout), nn.Linear(hidden_features, num_classes))

    def forward(self, video: Tensor) -> Tensor:
        features = self.features(video)  # [B, D, T, H', W']
        if self.head == "pool":
            return self.classifier(self.global_pool(features).flatten(1))
        frames, height, width = self.built_for
        if tuple(features.shape[2:]) != (frames, height // 4, width // 4):  # (another T·H·W of the same product ran
            # silently: the MLP is sized for these T, H', W')
            raise ValueError(f"late_fusion(head='fc'): built for {frames} frames of {height}x{width}, got video of "
                             f"shape {tuple(video.shape)}")
        # frame-major flattening: the MLP sees each frame's features at a fixed position
        return self.classifier(features.transpose(1, 2).flatten(1))


class EarlyFusion(nn.Module):
    """Early fusion (seed 003): the ``T`` frames are stacked into ``C·T`` channels and the first 2D
    conv sees all of them (temporal receptive field ``T`` at once); the rest is a 2D CNN:
    Conv2D(3×3, C·T→c1) + ReLU, Pool2D(4×4), Conv2D(3×3, c1→c2) + ReLU, GlobalAvgPool, linear.

    ``forward(video [B, C, frames, H, W])`` → class scores ``[B, num_classes]``; the clip length
    is fixed by ``frames``."""

    def __init__(self, num_classes: int, in_channels: int = 3, frames: int = 20,
                 channels: Sequence[int] = (12, 24), batch_norm: bool = True):
        super().__init__()
        first, second = channels
        self.frames = frames
        self.conv1 = conv_block(nn.Conv2d(in_channels * frames, first, 3, padding=1), batch_norm)
        self.pool1 = nn.MaxPool2d(4)
        self.conv2 = conv_block(nn.Conv2d(first, second, 3, padding=1), batch_norm)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(second, num_classes)

    def forward(self, video: Tensor) -> Tensor:
        B, C, T, H, W = video.shape
        if T != self.frames:
            raise ValueError(f"early_fusion: built for {self.frames} frames, got video of shape {tuple(video.shape)}")
        x = video.reshape(B, C * T, H, W)  # channel index c·T + t
        x = self.conv2(self.pool1(self.conv1(x)))
        return self.classifier(self.global_pool(x).flatten(1))


class SlowFusion(nn.Module):
    """3D CNN, "slow fusion" (seed 003): time is fused a little in every layer.
    Conv3D(3×3×3, C→c1) + ReLU, Pool3D(4×4×4), Conv3D(3×3×3, c1→c2) + ReLU, GlobalAvgPool, linear.

    ``forward(video [B, C, T, H, W])`` → class scores ``[B, num_classes]``."""

    def __init__(self, num_classes: int, in_channels: int = 3, channels: Sequence[int] = (12, 24),
                 batch_norm: bool = True):
        super().__init__()
        first, second = channels
        self.conv1 = conv_block(nn.Conv3d(in_channels, first, 3, padding=1), batch_norm)
        self.pool1 = nn.MaxPool3d(4)
        self.conv2 = conv_block(nn.Conv3d(first, second, 3, padding=1), batch_norm)
        self.global_pool = nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Linear(second, num_classes)

    def forward(self, video: Tensor) -> Tensor:
        x = self.conv2(self.pool1(self.conv1(video)))
        return self.classifier(self.global_pool(x).flatten(1))


# Builders. Defaults: the table's 3 × 20 × 64 × 64 input and widths 12, 24; 487 classes (Sports-1M,
# the data set of Karpathy et al.). ``batch_norm=False`` gives the table's bare conv + ReLU.
@register("single_frame")
def single_frame(num_classes: int = 487, in_channels: int = 3, frames: int = 20, height: int = 64,
                 width: int = 64, channels: Sequence[int] = (12, 24), batch_norm: bool = True) -> SingleFrame:
    """Single-frame baseline (seed 003); any input size (``frames``/``height``/``width`` are accepted
    for a uniform builder signature)."""
    return SingleFrame(num_classes, in_channels, channels, batch_norm)


@register("late_fusion")
def late_fusion(num_classes: int = 487, head: str = "pool", in_channels: int = 3, frames: int = 20,
                height: int = 64, width: int = 64, channels: Sequence[int] = (12, 24), batch_norm: bool = True,
                hidden_features: int = 256, dropout: float = 0.5) -> LateFusion:
    """Late fusion (seed 003 table), ``head="pool"`` (any input size) or ``"fc"`` (sized for
    ``frames × height × width``)."""
    return LateFusion(num_classes, head, in_channels, channels, batch_norm, frames, height, width,
                      hidden_features, dropout)


@register("early_fusion")
def early_fusion(num_classes: int = 487, in_channels: int = 3, frames: int = 20, height: int = 64,
                 width: int = 64, channels: Sequence[int] = (12, 24), batch_norm: bool = True) -> EarlyFusion:
    """Early fusion (seed 003 table) for clips of ``frames`` frames (any height/width >= 4)."""
    return EarlyFusion(num_classes, in_channels, frames, channels, batch_norm)


@register("slow_fusion")
def slow_fusion(num_classes: int = 487, in_channels: int = 3, frames: int = 20, height: int = 64,
                width: int = 64, channels: Sequence[int] = (12, 24), batch_norm: bool = True) -> SlowFusion:
    """3D CNN / slow fusion (seed 003 table); any input with ``frames, height, width >= 4``."""
    return SlowFusion(num_classes, in_channels, channels, batch_norm)


__all__ = ["conv_block", "PerFrame", "TableFrameCNN", "SingleFrame", "LateFusion", "EarlyFusion", "SlowFusion",
           "single_frame", "late_fusion", "early_fusion", "slow_fusion"]
