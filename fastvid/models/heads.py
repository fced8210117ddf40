"""Aggregation heads over frame features, and the ``netvlad`` model (seed 004: the YouTube-8M
winners, Miech et al., "Learnable pooling with Context Gating for video classification", 2017).

``NetVLADHead`` turns the frame features ``[B, T, D]`` of any per-frame model into class scores:
NetVLAD pooling → linear projection → Context Gating → linear classifier (the paper's classifier is
a mixture of experts followed by a second gating; a linear layer stands in here)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..nn.aggregation import ContextGating, NetVLAD
from ._registry import register
from .backbones import FrameCNN, per_frame


class NetVLADHead(nn.Module):
    """``forward(frame_features [B, T, in_features])`` → class scores ``[B, num_classes]``:
    NetVLAD (``clusters`` centres) → ``Linear(clusters·in_features, hidden_features)`` → ContextGating
    → dropout → ``Linear(hidden_features, num_classes)``. Invariant to the order of the frames."""

    def __init__(self, in_features: int, num_classes: int, clusters: int = 64, hidden_features: int = 1024,
                 dropout: float = 0.0):
        super().__init__()
        self.pool = NetVLAD(in_features, clusters)
        self.project = nn.Linear(self.pool.out_features, hidden_features)
        self.gating = ContextGating(hidden_features)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_features, num_classes)

    def forward(self, frame_features: Tensor) -> Tensor:
        clip = self.gating(self.project(self.pool(frame_features)))
        return self.classifier(self.dropout(clip))


class FrameNetVLAD(nn.Module):
    """Per-frame ``FrameCNN`` (spatially averaged features) → ``NetVLADHead``.
    ``forward(video [B, C, T, H, W])`` → class scores ``[B, num_classes]``."""

    def __init__(self, num_classes: int, in_channels: int = 3, channels: Sequence[int] = (32, 64, 128),
                 clusters: int = 64, hidden_features: int = 1024, dropout: float = 0.0):
        super().__init__()
        self.frame_cnn = FrameCNN(in_channels, channels)
        self.head = NetVLADHead(self.frame_cnn.out_channels, num_classes, clusters, hidden_features, dropout)

    def forward(self, video: Tensor) -> Tensor:
        return self.head(per_frame(self.frame_cnn.pooled, video))  # frame features [B, T, D]


@register("netvlad")
def netvlad(num_classes: int = 3862, in_channels: int = 3, frames: int = 300, height: int = 224, width: int = 224,
            channels: Sequence[int] = (32, 64, 128), clusters: int = 64, hidden_features: int = 1024,
            dropout: float = 0.0) -> FrameNetVLAD:
    """FrameCNN → NetVLAD → context gating → classifier. Any clip size (frames at least 2^len(channels) pixels a
    side; ``frames``/``height``/``width`` are accepted for a uniform builder signature; YouTube-8M: up to 300
    frames at 1 fps, 3862 classes)."""
    return FrameNetVLAD(num_classes, in_channels, channels, clusters, hidden_features, dropout)


__all__ = ["NetVLADHead", "FrameNetVLAD", "netvlad"]
