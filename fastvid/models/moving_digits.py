"""Moving digits: a synthetic next-frames prediction task in the spirit of Moving MNIST
(Srivastava et al. 2015; the data set of Shi et al. 2015), drawn in code, no download.

Each clip shows ``digits`` digits bouncing inside a ``size × size`` frame. A digit is a 5×7 bitmap
from the built-in glyph set below, scaled up by an integer factor (default ``max(1, size // 16)``:
5×7 pixels at 16×16, 20×28 at 64×64, close to Moving MNIST's 28×28 digits in 64×64 frames). Each
digit starts at a uniform random place with a random direction and speed and is reflected at the
borders; overlapping digits combine by maximum. Pixels are 0 or 1.

Everything comes from ``seed`` through a private ``torch.Generator``: the same arguments give the
same tensors.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

# 5 columns × 7 rows per digit, '#' = lit.
_GLYPH_ROWS = {
    0: (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    1: ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    2: (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    3: ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    4: ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    5: ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    6: ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    7: ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    8: (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    9: (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
}
GLYPH_HEIGHT, GLYPH_WIDTH = 7, 5


def glyphs(scale: int = 1) -> Tensor:
    """The ten digit bitmaps ``[10, 7·scale, 5·scale]`` (float, 0/1), each pixel a scale × scale block."""
    if scale < 1:
        raise ValueError(f"glyphs: scale must be >= 1, got {scale}")
    bitmaps = torch.tensor([[[float(ch == "#") for ch in row] for row in _GLYPH_ROWS[d]] for d in range(10)])
    return bitmaps.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


class MovingDigits(NamedTuple):
    """``videos`` ``[N, 1, T, H, W]`` float32 in {0, 1}; ``digits`` ``[N, digits]`` int64, which digit
    each moving glyph shows; ``positions`` ``[N, T, digits, 2]`` int64, each glyph's top-left (y, x)."""
    videos: Tensor
    digits: Tensor
    positions: Tensor


def _bounce(start: Tensor, velocity: Tensor, frames: int, limit: int) -> Tensor:
    """Positions ``[..., frames]`` of points moving at ``velocity`` from ``start`` inside [0, limit],
    reflected at both ends (the closed form of a ball bouncing between two walls)."""
    if limit == 0:
        return start.new_zeros(*start.shape, frames)
    travelled = start[..., None] + velocity[..., None] * torch.arange(frames, dtype=start.dtype)
    folded = torch.remainder(travelled, 2 * limit)  # period 2·limit: there and back
    return torch.where(folded > limit, 2 * limit - folded, folded)


def moving_digits(num_clips: int, frames: int = 20, size: int = 64, digits: int = 2, seed: int = 0,
                  scale: Optional[int] = None, speeds: Tuple[float, float] = (1.0, 3.0)) -> MovingDigits:
    """Generates ``num_clips`` clips of ``frames`` frames of ``size × size`` pixels, one channel.

    ``digits`` glyphs per clip, each scaled ``scale`` times (default ``max(1, size // 16)``); each
    moves at a speed drawn uniformly from ``speeds`` (pixels per frame) in a uniform direction."""
    scale = max(1, size // 16) if scale is None else scale
    bitmaps = glyphs(scale)
    glyph_h, glyph_w = bitmaps.shape[1:]
    if num_clips < 1 or frames < 1 or digits < 1:
        raise ValueError(f"moving_digits: num_clips, frames and digits must be >= 1, got {num_clips}, {frames}, {digits}")
    if size < max(glyph_h, glyph_w):
        raise ValueError(f"moving_digits: size {size} is smaller than a glyph ({glyph_h}x{glyph_w} at scale {scale})")
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64)

    which = torch.randint(10, (num_clips, digits), generator=generator)
    limits = (size - glyph_h, size - glyph_w)
    angle = 2 * math.pi * uniform(num_clips, digits)
    speed = speeds[0] + (speeds[1] - speeds[0]) * uniform(num_clips, digits)
    y = _bounce(uniform(num_clips, digits) * limits[0], speed * torch.sin(angle), frames, limits[0])
    x = _bounce(uniform(num_clips, digits) * limits[1], speed * torch.cos(angle), frames, limits[1])
    positions = torch.stack([y, x], dim=-1).round().long().permute(0, 2, 1, 3)  # [N, T, digits, 2]

    # Each canvas pixel looks up the glyph pixel under it (zero outside the glyph's box).
    rows = torch.arange(size)[:, None] - positions[..., 0, None, None]  # [N, T, digits, H, 1]
    cols = torch.arange(size)[None, :] - positions[..., 1, None, None]  # [N, T, digits, 1, W]
    inside = (rows >= 0) & (rows < glyph_h) & (cols >= 0) & (cols < glyph_w)
    pixels = bitmaps[which[:, None, :, None, None], rows.clamp(0, glyph_h - 1), cols.clamp(0, glyph_w - 1)]
    videos = (pixels * inside).amax(dim=2)  # [N, T, H, W]
    return MovingDigits(videos[:, None].float().contiguous(), which, positions)


__all__ = ["GLYPH_HEIGHT", "GLYPH_WIDTH", "glyphs", "MovingDigits", "moving_digits"]
