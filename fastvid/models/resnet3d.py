"""3D ResNet-50 video models: the nonlocal I3D ResNet-50 of Wang et al. ("Non-local Neural Networks",
CVPR 2018) and SlowFast R50 (Feichtenhofer et al., ICCV 2019), both from one bottleneck builder.

A bottleneck is ``kt×1×1`` (inner) → ``1×3×3`` (inner, spatial stride) → ``1×1×1`` (out), BatchNorm
after each conv, ReLU, plus a projection shortcut where the width or the stride changes; only the
temporal kernel ``kt`` of the first conv differs between the models (1 or 3, "inflated" or not).
Videos are ``[B, C, T, H, W]``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..nn import NonLocalBlock
from ._registry import register

RESNET50_BLOCKS = (3, 4, 6, 3)



def shortcut(in_channels: int, out_channels: int, spatial_stride: int) -> nn.Module:
    """The residual branch's shortcut: identity, or a strided 1×1×1 conv + BN where the width or the
    spatial size changes."""
    if in_channels == out_channels and spatial_stride == 1:
        return nn.Identity()
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, stride=(1, spatial_stride, spatial_stride), bias=False),
                         nn.BatchNorm3d(out_channels))

class Bottleneck3d(nn.Module):
    """ResNet bottleneck for video. ``[B, in, T, H, W] -> [B, out, T, H / s, W / s]``."""

    def __init__(self, in_channels: int, inner_channels: int, out_channels: int, temporal_kernel: int = 1,
                 spatial_stride: int = 1):
        super().__init__()
        if temporal_kernel % 2 != 1:
            raise ValueError(f"Bottleneck3d: temporal_kernel must be odd (time size kept), got {temporal_kernel}")
        self.temporal_kernel = temporal_kernel
        self.conv_a = nn.Conv3d(in_channels, inner_channels, (temporal_kernel, 1, 1),
                                padding=(temporal_kernel // 2, 0, 0), bias=False)
        self.norm_a = nn.BatchNorm3d(inner_channels)
        self.conv_b = nn.Conv3d(inner_channels, inner_channels, (1, 3, 3), stride=(1, spatial_stride, spatial_stride),
                                padding=(0, 1, 1), bias=False)
        self.norm_b = nn.BatchNorm3d(inner_channels)
        self.conv_c = nn.Conv3d(inner_channels, out_channels, 1, bias=False)
        self.norm_c = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_channels, out_channels, spatial_stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.norm_a(self.conv_a(x)))
        y = self.relu(self.norm_b(self.conv_b(y)))
        y = self.norm_c(self.conv_c(y))
        return self.relu(y + self.shortcut(x))


def res_stage(in_channels: int, inner_channels: int, out_channels: int, temporal_kernels: Sequence[int],
              spatial_stride: int = 1, nonlocal_after: Sequence[int] = (),
              nonlocal_mode: str = "embedded_gaussian") -> nn.Sequential:
    """One ResNet stage: ``len(temporal_kernels)`` bottlenecks (the first one strided), with a
    ``NonLocalBlock`` (inter = C/2, φ/g max-pooled 1×2×2, γ = 0 at init) inserted right after each
    0-based block index in ``nonlocal_after``."""
    bad = [i for i in nonlocal_after if not 0 <= i < len(temporal_kernels)]
    if bad:
        raise ValueError(f"res_stage: nonlocal_after indices {bad} outside the stage's {len(temporal_kernels)} blocks")
    layers: List[nn.Module] = []
    for index, kt in enumerate(temporal_kernels):
        layers.append(Bottleneck3d(in_channels if index == 0 else out_channels, inner_channels, out_channels,
                                   temporal_kernel=kt, spatial_stride=spatial_stride if index == 0 else 1))
        if index in nonlocal_after:
            layers.append(NonLocalBlock(out_channels, out_channels // 2, mode=nonlocal_mode, sub_sample=True,
                                        norm=True, dims=3))
    return nn.Sequential(*layers)


def _stem(in_channels: int, out_channels: int, temporal_kernel: int) -> nn.Sequential:
    """``kt×7×7`` conv, stride (1, 2, 2), BN, ReLU, ``1×3×3`` max-pool stride (1, 2, 2): H and W / 4."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, (temporal_kernel, 7, 7), stride=(1, 2, 2),
                  padding=(temporal_kernel // 2, 3, 3), bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))


def _classifier(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(1), nn.Dropout(dropout), nn.Linear(in_features, num_classes))


# --------------------------------------------------------------------------------------------------
# Nonlocal I3D ResNet-50
# --------------------------------------------------------------------------------------------------

def i3d_inflation_pattern(stage_blocks: Sequence[int]) -> List[List[int]]:
    """Which blocks get a 3×1×1 first conv (1) or a 1×1×1 one (0), Wang et al.'s I3D-R50 rule:
    every block of res2, every other block of res3 and res4 starting with the first, the middle
    ones of res5. For (3, 4, 6, 3): [1,1,1], [1,0,1,0], [1,0,1,0,1,0], [0,1,0]."""
    res2, res3, res4, res5 = stage_blocks
    return [[1] * res2, [(i + 1) % 2 for i in range(res3)], [(i + 1) % 2 for i in range(res4)],
            [i % 2 for i in range(res5)]]


def nonlocal_pattern(stage_blocks: Sequence[int]) -> List[List[int]]:
    """0-based indices of the blocks followed by a nonlocal block: every other block of res3 and
    res4, starting with the second. For (3, 4, 6, 3): res3 after blocks 1 and 3, res4 after blocks
    1, 3 and 5 — 5 nonlocal blocks."""
    res2, res3, res4, res5 = stage_blocks
    return [[], list(range(1, res3, 2)), list(range(1, res4, 2)), []]


class NonLocalI3DResNet(nn.Module):
    """I3D ResNet-50 with nonlocal blocks. ``forward(video [B, 3, T, H, W]) -> [B, num_classes]``.

    conv1 5×7×7 stride (1, 2, 2), pool1 1×3×3 stride (1, 2, 2); res2; pool2 2×1×1 max stride
    (2, 1, 1) (the only temporal down-sampling: T/2 from res3 on); res3–res5 with spatial stride 2;
    global average pool, dropout, linear. Spatial size / 32 at res5. ``stages[i]`` is res(i+2), an
    ``nn.Sequential`` of ``Bottleneck3d`` with the ``NonLocalBlock``s placed among them.

    ``inflate``: per stage, one 0/1 flag per block (1: 3×1×1 first conv), default
    ``i3d_inflation_pattern``; ``nonlocal_blocks``: per stage, the 0-based indices of the blocks a
    nonlocal block follows, default ``nonlocal_pattern``."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3, base_channels: int = 64,
                 stage_blocks: Sequence[int] = RESNET50_BLOCKS, inflate: Optional[Sequence[Sequence[int]]] = None,
                 nonlocal_blocks: Optional[Sequence[Sequence[int]]] = None, nonlocal_mode: str = "embedded_gaussian",
                 dropout: float = 0.5):
        super().__init__()
        if len(stage_blocks) != 4:
            raise ValueError(f"stage_blocks must give 4 stages (res2..res5), got {stage_blocks}")
        inflate = inflate if inflate is not None else i3d_inflation_pattern(stage_blocks)
        nonlocal_blocks = nonlocal_blocks if nonlocal_blocks is not None else nonlocal_pattern(stage_blocks)
        self.stem = _stem(in_channels, base_channels, temporal_kernel=5)
        self.temporal_pool = nn.MaxPool3d((2, 1, 1), stride=(2, 1, 1))
        stages = []
        channels = base_channels
        for index, (blocks, inflated, nonlocal_after) in enumerate(zip(stage_blocks, inflate, nonlocal_blocks)):
            if len(inflated) != blocks:
                raise ValueError(f"inflate[{index}] has {len(inflated)} entries for {blocks} blocks")
            inner = base_channels * 2 ** index
            stages.append(res_stage(channels, inner, 4 * inner, [3 if flag else 1 for flag in inflated],
                                    spatial_stride=1 if index == 0 else 2, nonlocal_after=nonlocal_after,
                                    nonlocal_mode=nonlocal_mode))
            channels = 4 * inner
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.classifier = _classifier(channels, num_classes, dropout)
        self.out_features = channels

    def features(self, video: Tensor) -> Tensor:
        """res5 output ``[B, 32·base_channels, T/2, H/32, W/32]``."""
        x = self.stages[0](self.stem(video))
        x = self.temporal_pool(x)
        for stage in self.stages[1:]:
            x = stage(x)
        return x

    def forward(self, video: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(video)))


@register("nonlocal_i3d_r50")
def nonlocal_i3d_r50(num_classes: int = 400, in_channels: int = 3, frames: int = 32, height: int = 224,
                     width: int = 224, base_channels: int = 64, stage_blocks: Sequence[int] = RESNET50_BLOCKS,
                     nonlocal_mode: str = "embedded_gaussian", dropout: float = 0.5) -> NonLocalI3DResNet:
    """Nonlocal I3D ResNet-50 (Wang et al. 2018; seed 003: "Nonlocal Block ... insert into existing
    3D CNNs").

    Nonlocal placement: Wang et al. add "5 blocks: 3 to res4 and 2 to res3, to every other residual
    block". We read "every other" as the second, fourth, ... block of the stage, i.e. a nonlocal
    block right after 0-based blocks 1 and 3 of res3 and 1, 3, 5 of res4 (the published
    configurations of this model, e.g. mmaction2's ``non_local=((0,0,0), (0,1,0,1), (0,1,0,1,0,1),
    (0,0,0))``, place them there too). Each is ``NonLocalBlock(C, C/2)`` (embedded Gaussian by
    default, φ and g max-pooled 1×2×2, BatchNorm with γ = β = 0, so the untrained block is the
    identity).

    Input: Wang et al. train on 32-frame 224² clips (``frames``, ``height``, ``width`` are the paper's
    input size; any T ≥ 2 and H, W ≥ 32 run: the head pools globally). ``base_channels`` and
    ``stage_blocks`` shrink the network for tests (64 and (3, 4, 6, 3) are ResNet-50)."""
    return NonLocalI3DResNet(num_classes, in_channels, base_channels, stage_blocks, nonlocal_mode=nonlocal_mode,
                             dropout=dropout)


# --------------------------------------------------------------------------------------------------
# SlowFast R50
# --------------------------------------------------------------------------------------------------

# Lateral (fast → slow) kernel sizes of the published SlowFast R50 models, by speed ratio α.
LATERAL_KERNEL = {8: 5, 4: 7}


class LateralConnection(nn.Sequential):
    """Time-strided convolution from the fast to the slow pathway: ``k×1×1`` conv, stride (α, 1, 1),
    ``βC -> 2βC`` channels, BN, ReLU. ``[B, βC, αT, H, W] -> [B, 2βC, T, H, W]`` (k odd, padding k//2)."""

    def __init__(self, fast_channels: int, out_channels: int, kernel: int, alpha: int):
        super().__init__(
            nn.Conv3d(fast_channels, out_channels, (kernel, 1, 1), stride=(alpha, 1, 1), padding=(kernel // 2, 0, 0),
                      bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True))


def _slowfast_pathways(video: Union[Tensor, Sequence[Tensor]], alpha: int) -> List[Tensor]:
    if isinstance(video, Tensor):
        if video.dim() != 5:
            raise ValueError(f"SlowFast: expected video [B, C, T, H, W], got {tuple(video.shape)}")
        if video.shape[2] % alpha:
            raise ValueError(f"SlowFast: the fast clip's T={video.shape[2]} must be a multiple of alpha={alpha}")
        return [video[:, :, ::alpha], video]
    slow, fast = video
    if slow.dim() != 5 or fast.dim() != 5 or fast.shape[2] != alpha * slow.shape[2]:
        raise ValueError(f"SlowFast: expected [slow [B, C, T, H, W], fast [B, C, {alpha}·T, H, W]], got "
                         f"{tuple(slow.shape)} and {tuple(fast.shape)}")
    return [slow, fast]


# torch.fx records the call as one node, run on the real input: traced, a video is a symbolic value that
# the Tensor-or-pair test above cannot tell apart (it took the pair branch, the batch's first two clips).
torch.fx.wrap("_slowfast_pathways")


class SlowFast(nn.Module):
    """SlowFast network (ResNet-50 pathways). ``forward(video)`` with ``video`` ``[B, 3, αT, H, W]``
    (the fast pathway's frames; the slow pathway takes every α-th frame, ``video[:, :, ::α]``, which
    are the frames the time-strided lateral convs are centred on), or ``forward([slow, fast])`` with
    ``slow`` ``[B, 3, T, H, W]`` and ``fast`` ``[B, 3, αT, H, W]`` already sampled. Returns
    ``[B, num_classes]``.

    Pathways (seed 003 table, C = ``base_channels``): slow conv1 1×7×7 C, res2–res5 bottlenecks of
    inner C, 2C, 4C, 8C with first-conv temporal kernels 1, 1, 3, 3; fast conv1 5×7×7 βC and inner βC,
    2βC, 4βC, 8βC with temporal kernel 3 throughout. No temporal stride or pooling anywhere: the slow
    pathway keeps T frames and the fast one αT. A ``LateralConnection`` to 2βC channels after the
    stem and after res2, res3, res4 is concatenated onto the slow features (so res2 of the slow
    pathway takes C + 2βC channels). Head: global average pool of each pathway, concat, dropout,
    linear. Module lists: ``slow_stages[i]``/``fast_stages[i]`` are res(i+2), ``laterals[0]`` follows
    the stems and ``laterals[i]`` res(i+1)."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3, alpha: int = 8, beta: float = 1 / 8,
                 base_channels: int = 64, stage_blocks: Sequence[int] = RESNET50_BLOCKS,
                 lateral_kernel: Optional[int] = None, lateral_channel_ratio: int = 2, dropout: float = 0.5):
        super().__init__()
        if not (isinstance(alpha, int) and alpha >= 1):
            raise ValueError(f"SlowFast: alpha must be a positive int, got {alpha!r}")
        if lateral_kernel is None:
            if alpha not in LATERAL_KERNEL:
                raise ValueError(f"SlowFast: no published lateral kernel for alpha={alpha} (known: "
                                 f"{LATERAL_KERNEL}); pass lateral_kernel")
            lateral_kernel = LATERAL_KERNEL[alpha]
        if lateral_kernel % 2 != 1:
            raise ValueError(f"SlowFast: lateral_kernel must be odd, got {lateral_kernel}")
        if len(stage_blocks) != 4:
            raise ValueError(f"stage_blocks must give 4 stages (res2..res5), got {stage_blocks}")
        self.alpha, self.beta, self.lateral_kernel = alpha, beta, lateral_kernel

        def fast(width: int) -> int:
            channels = round(width * beta)
            if channels < 1:
                raise ValueError(f"SlowFast: beta={beta} leaves the fast pathway no channels at width {width}")
            return channels

        slow_channels, fast_channels = base_channels, fast(base_channels)
        self.slow_stem = _stem(in_channels, slow_channels, temporal_kernel=1)
        self.fast_stem = _stem(in_channels, fast_channels, temporal_kernel=5)
        laterals = [LateralConnection(fast_channels, lateral_channel_ratio * fast_channels, lateral_kernel, alpha)]
        slow_stages, fast_stages = [], []
        slow_temporal_kernels = (1, 1, 3, 3)
        for index, blocks in enumerate(stage_blocks):
            stride = 1 if index == 0 else 2
            slow_in = slow_channels + lateral_channel_ratio * fast_channels
            slow_inner, fast_inner = base_channels * 2 ** index, fast(base_channels * 2 ** index)
            slow_stages.append(res_stage(slow_in, slow_inner, 4 * slow_inner,
                                         [slow_temporal_kernels[index]] * blocks, spatial_stride=stride))
            fast_stages.append(res_stage(fast_channels, fast_inner, 4 * fast_inner, [3] * blocks,
                                         spatial_stride=stride))
            slow_channels, fast_channels = 4 * slow_inner, 4 * fast_inner
            if index < 3:
                laterals.append(LateralConnection(fast_channels, lateral_channel_ratio * fast_channels,
                                                  lateral_kernel, alpha))
        self.slow_stages, self.fast_stages = nn.ModuleList(slow_stages), nn.ModuleList(fast_stages)
        self.laterals = nn.ModuleList(laterals)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.classifier = _classifier(slow_channels + fast_channels, num_classes, dropout)
        self.out_features = slow_channels + fast_channels

    def pathways(self, video: Union[Tensor, Sequence[Tensor]]) -> List[Tensor]:
        """``[slow, fast]`` input clips from ``video`` (see the class docstring), checked."""
        return _slowfast_pathways(video, self.alpha)

    def features(self, video: Union[Tensor, Sequence[Tensor]]) -> Dict[str, Tensor]:
        """res5 outputs ``{"slow": [B, 32C, T, H/32, W/32], "fast": [B, 32βC, αT, H/32, W/32]}``."""
        slow, fast = self.pathways(video)
        slow, fast = self.slow_stem(slow), self.fast_stem(fast)
        slow = torch.cat([slow, self.laterals[0](fast)], dim=1)
        for index, (slow_stage, fast_stage) in enumerate(zip(self.slow_stages, self.fast_stages)):
            slow, fast = slow_stage(slow), fast_stage(fast)
            if index + 1 < len(self.laterals):
                slow = torch.cat([slow, self.laterals[index + 1](fast)], dim=1)
        return {"slow": slow, "fast": fast}

    def forward(self, video: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        pathways = self.features(video)
        pooled = torch.cat([self.pool(pathways["slow"]), self.pool(pathways["fast"])], dim=1)
        return self.classifier(pooled)


@register("slowfast_r50")
def slowfast_r50(num_classes: int = 400, in_channels: int = 3, alpha: int = 8, beta: float = 1 / 8,
                 frames: int = 32, height: int = 224, width: int = 224, base_channels: int = 64,
                 stage_blocks: Sequence[int] = RESNET50_BLOCKS, lateral_kernel: Optional[int] = None,
                 dropout: float = 0.5) -> SlowFast:
    """SlowFast R50 (seed 003 table: α = 8, β = 1/8; from a 64-frame raw clip the slow pathway sees 4
    frames (stride 16) and the fast one 32 (stride 2), at 224²). ``frames`` is the fast pathway's
    frame count (the input's T; the slow pathway gets ``frames / alpha``). Lateral kernel 5×1×1 for
    α = 8 and 7×1×1 for α = 4 (the published SlowFast R50 models); other α need ``lateral_kernel``.
    ``base_channels`` and ``stage_blocks`` shrink the network for tests."""
    return SlowFast(num_classes, in_channels, alpha, beta, base_channels, stage_blocks, lateral_kernel,
                    dropout=dropout)


__all__ = ["Bottleneck3d", "res_stage", "i3d_inflation_pattern", "nonlocal_pattern", "NonLocalI3DResNet",
           "nonlocal_i3d_r50", "LateralConnection", "SlowFast", "slowfast_r50"]
