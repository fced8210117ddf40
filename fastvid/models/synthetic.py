"""A synthetic video classification task that only a model of temporal order can solve.

Each clip shows a bright square over Gaussian noise. During the first half of the clip the square
moves horizontally (right or left); then it reappears at a new random place and, during the second
half, moves vertically (down or up). The class is the pair of directions::

    0: right, then down     1: right, then up     2: left, then down     3: left, then up

Why no order-blind model can beat chance (by construction, not by training luck): the square moves on
a torus (it wraps around the borders), each half starts at a position drawn uniformly and
independently of everything else, the speed is drawn independently of the class, and the noise is
i.i.d. per frame. Playing one half backwards in time turns a square moving right from a uniform start
into a square moving left from a (different, still uniform) start, and leaves the noise distribution
unchanged. So the four classes are time-reversals of one another's halves, and the *unordered*
collection of frames of a clip has exactly the same distribution in every class. Any model whose
output depends on the frames only as a set — one frame alone, class probabilities averaged over
frames (``single_frame``), features averaged over time (``late_fusion(head="pool")``), NetVLAD
pooling over frames — has the same output distribution for every class, hence expected accuracy
``1 / 4`` on held-out clips. A model that compares neighbouring frames (3D convolutions, early
fusion, recurrent models, an MLP over ordered frame features) can read the directions.

Everything is generated from ``seed`` with a private ``torch.Generator``: the same arguments give the
same tensors. ``flow=True`` also returns the exact optical flow (for two-stream models).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

CLASS_NAMES = ("right, then down", "right, then up", "left, then down", "left, then up")
NUM_CLASSES = len(CLASS_NAMES)


class MotionClips(NamedTuple):
    """``videos`` ``[N, 3, T, H, W]`` float32; ``labels`` ``[N]`` int64 in ``0..3``; ``flow``
    ``[N, 2, T-1, H, W]`` (displacement ``(dx, dy)`` in pixels from frame ``t`` to ``t+1`` at the
    square's pixels, 0 elsewhere and across the jump between the halves) or ``None``."""
    videos: Tensor
    labels: Tensor
    flow: Optional[Tensor]


def motion_clips(num_clips: int, frames: int = 16, size: int = 32, seed: int = 0, noise: float = 0.5,
                 square: Optional[int] = None, speeds=(1, 2), flow: bool = False) -> MotionClips:
    """Generates ``num_clips`` clips of ``frames`` frames of ``size × size`` pixels, 3 channels.

    The classes are balanced (``num_clips // 4`` or one more each) and shuffled. ``noise`` is the
    standard deviation of the background noise (the square adds 1.0 on all channels), ``square`` its
    side in pixels (default ``size // 8``, at least 2), ``speeds`` the possible speeds in pixels per
    frame (one drawn per clip, the same in both halves)."""
    if frames < 4:
        raise ValueError(f"motion_clips: frames must be >= 4 (two frames per half), got {frames}")
    if size < 4:
        raise ValueError(f"motion_clips: size must be >= 4, got {size}")
    square = max(2, size // 8) if square is None else square
    generator = torch.Generator().manual_seed(seed)

    def uniform_ints(high: int, *shape: int) -> Tensor:
        return torch.randint(high, shape, generator=generator)

    labels = (torch.arange(num_clips) % NUM_CLASSES)[torch.randperm(num_clips, generator=generator)]
    horizontal_sign = 1 - 2 * (labels // 2)  # classes 0, 1 move right (+x); 2, 3 move left
    vertical_sign = 1 - 2 * (labels % 2)  # classes 0, 2 move down (+y); 1, 3 move up
    speed = torch.tensor(speeds)[uniform_ints(len(speeds), num_clips)]

    first_half = frames // 2
    steps = torch.arange(frames)
    in_first_half = steps < first_half
    # step count since the start of the clip's half: 0, 1, ... in each half
    step_in_half = torch.where(in_first_half, steps, steps - first_half)
    start_x = uniform_ints(size, num_clips, 2)  # [:, 0] first half, [:, 1] second half
    start_y = uniform_ints(size, num_clips, 2)
    half_index = (~in_first_half).long()  # [T]
    x = start_x[:, half_index]  # [N, T]
    y = start_y[:, half_index]
    x = x + torch.where(in_first_half, horizontal_sign[:, None] * speed[:, None] * step_in_half, 0)
    y = y + torch.where(in_first_half, 0, vertical_sign[:, None] * speed[:, None] * step_in_half)
    x, y = x % size, y % size  # top-left corner of the square, on the torus

    pixels = torch.arange(size)
    inside_x = (pixels - x[..., None]) % size < square  # [N, T, W]
    inside_y = (pixels - y[..., None]) % size < square  # [N, T, H]
    mask = inside_y[..., :, None] & inside_x[..., None, :]  # [N, T, H, W]

    videos = noise * torch.randn(num_clips, 3, frames, size, size, generator=generator)
    videos += mask[:, None].float()

    flow_field = None
    if flow:
        moves = mask[:, :-1].float()  # pixels of the square in frame t, [N, T-1, H, W]
        same_half = (in_first_half[:-1] == in_first_half[1:]).float()  # no flow across the jump
        dx = torch.where(in_first_half[:-1], horizontal_sign[:, None] * speed[:, None], 0) * same_half
        dy = torch.where(in_first_half[:-1], 0, vertical_sign[:, None] * speed[:, None]) * same_half
        flow_field = torch.stack([moves * dx[..., None, None], moves * dy[..., None, None]], dim=1)
    return MotionClips(videos, labels, flow_field)


__all__ = ["CLASS_NAMES", "NUM_CLASSES", "MotionClips", "motion_clips"]
