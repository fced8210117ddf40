"""Two-stream networks (seeds 003 and 004): Simonyan & Zisserman, "Two-stream convolutional networks
for action recognition in videos" (NeurIPS 2014), with the conv fusion of Feichtenhofer et al.,
"Convolutional Two-Stream Network Fusion for Video Action Recognition" (CVPR 2016).

- Spatial stream: a 2D CNN on one RGB frame (appearance).
- Temporal stream: a 2D CNN whose first conv sees a stack of ``L`` optical-flow fields, ``2·L``
  channels ``(dx_1, dy_1, ..., dx_L, dy_L)`` — early fusion of flow over time (seed 003: "Input:
  stack of optical flow [2 × (T-1)] × H × W").
- Fusion ``"average"``: each stream's class probabilities, averaged (Simonyan & Zisserman);
  ``"conv"``: the two streams' last conv feature maps stacked on channels and fused by a learned 3×3×3
  conv over (snippets, height, width) + 3D max pooling (seed 004: "Modality fusion (appearance and
  temporal) at conv layer → 3D conv layer + pooling instead of late fusion (average score)").

Flow is an input: the model does not compute it. A clip is cut into ``snippets`` evenly spaced
snippets; each gives one flow stack of ``L`` consecutive fields and the RGB frame in its middle. The
streams are ``FrameCNN``s (``backbones.py``) standing in for the papers' ImageNet CNNs.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from ._registry import register
from .backbones import FrameCNN, per_frame

FUSIONS = ("average", "conv")


class TwoStream(nn.Module):
    """Two-stream network; ``forward(rgb, flow)`` → class scores ``[B, num_classes]``.

    - ``rgb``: ``[B, 3, T, H, W]`` video frames (or ``[B, 3, H, W]``: one frame, used by every snippet);
    - ``flow``: ``[B, 2, T_flow, H, W]`` optical flow, ``flow[:, :, t]`` the displacement
      ``(dx, dy)`` from frame ``t`` to ``t + 1`` (so usually ``T_flow = T - 1``), ``T_flow >= flow_frames``.

    With ``fusion="average"`` the scores are ``log`` of the probabilities averaged over the two
    streams and the snippets (log-probabilities: ``cross_entropy`` on them is the negative log of the
    averaged probability of the true class)."""

    def __init__(self, num_classes: int, in_channels: int = 3, flow_frames: int = 10, snippets: int = 1,
                 fusion: str = "average", channels: Sequence[int] = (32, 64, 128)):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"two_stream: fusion must be one of {FUSIONS}, got {fusion!r}")
        if flow_frames < 1 or snippets < 1:
            raise ValueError(f"two_stream: flow_frames and snippets must be >= 1, got {flow_frames}, {snippets}")
        self.fusion, self.flow_frames, self.snippets = fusion, flow_frames, snippets
        self.spatial = FrameCNN(in_channels, channels)
        self.temporal = FrameCNN(2 * flow_frames, channels)
        features = self.spatial.out_channels
        if fusion == "average":
            self.spatial_classifier = nn.Linear(features, num_classes)
            self.temporal_classifier = nn.Linear(features, num_classes)
        else:
            self.fuse = nn.Sequential(nn.Conv3d(2 * features, features, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.AdaptiveMaxPool3d(1))
            self.classifier = nn.Linear(features, num_classes)

    def snippet_starts(self, flow_length: int) -> List[int]:
        """First flow index of each snippet's stack: evenly spaced, the last one ending at the clip's end."""
        free = flow_length - self.flow_frames
        if self.snippets == 1:
            return [free // 2]
        return [round(index * free / (self.snippets - 1)) for index in range(self.snippets)]

    def split_snippets(self, rgb: Tensor, flow: Tensor):
        """Returns the snippets' RGB frames ``[B, 3, S, H, W]`` and flow stacks ``[B, 2L, S, H, W]``."""
        if rgb.dim() == 4:
            rgb = rgb.unsqueeze(2)
        if rgb.dim() != 5 or flow.dim() != 5 or flow.shape[1] != 2:
            raise ValueError(f"two_stream: expected rgb [B, C, T, H, W] or [B, C, H, W] and flow [B, 2, T_flow, H, W], "
                             f"got {tuple(rgb.shape)} and {tuple(flow.shape)}")
        if flow.shape[2] < self.flow_frames:
            raise ValueError(f"two_stream: flow has {flow.shape[2]} fields, the stack needs flow_frames = {self.flow_frames}")
        if rgb.shape[0] != flow.shape[0] or rgb.shape[-2:] != flow.shape[-2:]:
            raise ValueError(f"two_stream: rgb {tuple(rgb.shape)} and flow {tuple(flow.shape)} differ in batch or H × W")
        B, _, _, H, W = flow.shape
        frames, stacks = [], []
        for start in self.snippet_starts(flow.shape[2]):
            frames.append(rgb[:, :, min(start + self.flow_frames // 2, rgb.shape[2] - 1)])
            window = flow[:, :, start:start + self.flow_frames]  # [B, 2, L, H, W]
            stacks.append(window.transpose(1, 2).reshape(B, 2 * self.flow_frames, H, W))  # dx_1, dy_1, dx_2, ...
        return torch.stack(frames, dim=2), torch.stack(stacks, dim=2)

    def forward(self, rgb: Tensor, flow: Tensor) -> Tensor:
        frames, stacks = self.split_snippets(rgb, flow)
        appearance = per_frame(self.spatial, frames)  # [B, S, D, h, w]
        motion = per_frame(self.temporal, stacks)
        if self.fusion == "average":
            spatial_log_probs = torch.log_softmax(self.spatial_classifier(appearance.mean(dim=(3, 4))), dim=-1)
            temporal_log_probs = torch.log_softmax(self.temporal_classifier(motion.mean(dim=(3, 4))), dim=-1)
            log_probs = torch.cat([spatial_log_probs, temporal_log_probs], dim=1)  # [B, 2S, K]
            return torch.logsumexp(log_probs, dim=1) - math.log(log_probs.shape[1])
        stacked = torch.cat([appearance, motion], dim=2).transpose(1, 2)  # [B, 2D, S, h, w]
        return self.classifier(self.fuse(stacked).flatten(1))


@register("two_stream")
def two_stream(num_classes: int = 101, in_channels: int = 3, frames: int = 11, height: int = 224, width: int = 224,
               flow_frames: Optional[int] = None, snippets: int = 1, fusion: str = "average",
               channels: Sequence[int] = (32, 64, 128)) -> TwoStream:
    """Two-stream network (seeds 003, 004). ``frames`` is the RGB clip length; the flow stack holds
    ``flow_frames`` fields (default ``min(10, frames - 1)``; Simonyan & Zisserman use L = 10); any
    height/width. 101 classes: UCF-101."""
    if flow_frames is None:
        flow_frames = min(10, frames - 1)
    if not 1 <= flow_frames <= frames - 1:
        raise ValueError(f"two_stream: flow_frames must be in 1..frames-1 = {frames - 1}, got {flow_frames}")
    return TwoStream(num_classes, in_channels, flow_frames, snippets, fusion, channels)


__all__ = ["TwoStream", "two_stream", "FUSIONS"]
