"""I3D (Carreira & Zisserman, "Quo Vadis, Action Recognition? A New Model and the Kinetics Dataset",
CVPR 2017): Inception-v1 with every 2D filter and pool made 3D, and ``inflate_2d_to_3d``, the
weight inflation that lets an image network initialise its 3D twin (seed 003: "copy K_t times in
space and divide by K_t — this gives the same result as 2D conv given 'constant' video input").
Videos are ``[B, C, T, H, W]``.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._sizes import pair, triple
from ._registry import register

# ------------------------------------------------------------------------------------------------
# Inflation
# ------------------------------------------------------------------------------------------------

TimeKernel = Union[int, Callable[[str, object], int]]


def _time_kernel_for(time_kernel: TimeKernel, name: str, item) -> int:
    t = time_kernel(name, item) if callable(time_kernel) else time_kernel
    if not isinstance(t, int) or t < 1:
        raise ValueError(f"inflate_2d_to_3d: time kernel for {name or 'the module'} must be a positive int, got {t!r}")
    return t


def inflate_conv_weight(weight: Tensor, time_kernel: int) -> Tensor:
    """``[O, I, kH, kW] -> [O, I, kT, kH, kW]``: the 2D filter repeated ``kT`` times along time and
    divided by ``kT``, so its response to a video of identical frames is the 2D response."""
    if weight.dim() != 4:
        raise ValueError(f"inflate_conv_weight: expected a 2D conv weight [O, I, kH, kW], got {tuple(weight.shape)}")
    return weight.unsqueeze(2).repeat(1, 1, time_kernel, 1, 1) / time_kernel


def _inflate_conv(conv: nn.Conv2d, t: int, time_padding: Optional[int]) -> nn.Conv3d:
    if isinstance(conv.padding, str):  # 'same' / 'valid' apply to time as well
        padding = conv.padding
    else:
        padding = (t // 2 if time_padding is None else time_padding, *conv.padding)
    conv3d = nn.Conv3d(conv.in_channels, conv.out_channels, (t, *conv.kernel_size), stride=(1, *conv.stride),
                       padding=padding, dilation=(1, *conv.dilation), groups=conv.groups,
                       bias=conv.bias is not None, padding_mode=conv.padding_mode,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        conv3d.weight.copy_(inflate_conv_weight(conv.weight, t))
        if conv.bias is not None:
            conv3d.bias.copy_(conv.bias)
    return conv3d.train(conv.training)


def _inflate_batchnorm(norm: nn.BatchNorm2d) -> nn.BatchNorm3d:
    like = norm.weight if norm.affine else norm.running_mean  # (one of them exists: BatchNorm2d has state)
    norm3d = nn.BatchNorm3d(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats,
                            device=None if like is None else like.device, dtype=None if like is None else like.dtype)
    norm3d.load_state_dict(norm.state_dict())  # same names, same shapes
    return norm3d.train(norm.training)


class _WindowFittingMaxPool3d(nn.MaxPool3d):
    """nn.MaxPool3d(k, stride=k) whose window shrinks to a dimension shorter than k: short clips reach
    I3D's pool_5a with one frame left (T <= 4 at 32x32), where nn.MaxPool3d raises "Output size is too
    small"; every map it could pool before pools as it did."""

    def __init__(self, kernel_size: int):
        super().__init__(kernel_size, stride=kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        window = _fitted_window((self.kernel_size,) * 3, x)
        return nn.functional.max_pool3d(x, window, window)


def _fitted_window(window: tuple, x: Tensor) -> tuple:
    """The (T, H, W) pooling window, each no larger than x's size there."""
    return tuple(min(k, size) for k, size in zip(window, x.shape[2:]))


torch.fx.wrap("_fitted_window")  # torch.fx records it as one node: traced, x's sizes are symbolic


def _inflate_pool(pool: nn.Module) -> Optional[nn.Module]:
    """2D pools become 3D pools of time size 1 (a static video is then pooled frame by frame)."""
    if isinstance(pool, nn.MaxPool2d):
        return nn.MaxPool3d((1, *pair(pool.kernel_size)), (1, *pair(pool.stride)), (0, *pair(pool.padding)),
                            (1, *pair(pool.dilation)), pool.return_indices, pool.ceil_mode)
    if isinstance(pool, nn.AvgPool2d):
        return nn.AvgPool3d((1, *pair(pool.kernel_size)), (1, *pair(pool.stride)), (0, *pair(pool.padding)),
                            pool.ceil_mode, pool.count_include_pad, pool.divisor_override)
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return nn.AdaptiveAvgPool3d((None, *pair(pool.output_size)))
    if isinstance(pool, nn.AdaptiveMaxPool2d):
        return nn.AdaptiveMaxPool3d((None, *pair(pool.output_size)), pool.return_indices)
    return None


def _inflate_module(module: nn.Module, name: str, time_kernel: TimeKernel,
                    time_padding: Optional[int]) -> Optional[nn.Module]:
    if type(module) is nn.Conv2d:
        return _inflate_conv(module, _time_kernel_for(time_kernel, name, module), time_padding)
    if type(module) is nn.BatchNorm2d:
        return _inflate_batchnorm(module)
    return _inflate_pool(module)


def _inflate_children(module: nn.Module, prefix: str, time_kernel: TimeKernel, time_padding: Optional[int]):
    for name, child in module.named_children():
        qualified = f"{prefix}.{name}" if prefix else name
        inflated = _inflate_module(child, qualified, time_kernel, time_padding)
        if inflated is not None:
            setattr(module, name, inflated)
        else:
            _inflate_children(child, qualified, time_kernel, time_padding)


def inflate_2d_to_3d(module_or_state_dict: Union[nn.Module, Mapping[str, Tensor]], time_kernel: TimeKernel,
                     time_padding: Optional[int] = None):
    """Inflates a 2D network (or its state dict) to 3D (Carreira & Zisserman 2017).

    * Module: returns a deep copy in which every ``nn.Conv2d`` with a ``kH×kW`` kernel becomes an
      ``nn.Conv3d`` with a ``kT×kH×kW`` kernel (time stride 1, time padding ``time_padding``, by
      default kT // 2), weights from ``inflate_conv_weight``; ``nn.BatchNorm2d`` becomes
      ``nn.BatchNorm3d`` with the same parameters and running statistics; max/avg/adaptive 2D pools
      become 3D pools of time size 1. Other modules are kept (elementwise ones run on 5-D input; a
      ``Flatten``/``Linear`` head must be adapted by the caller).
    * State dict: returns a new ``OrderedDict`` in which every 4-D tensor (a conv weight) is
      inflated and everything else (BatchNorm entries, biases, linear weights) is copied as is, for
      ``load_state_dict`` into a 3D twin whose parameters have the same names.

    ``time_kernel``: the kT of every conv, or ``time_kernel(name, conv_or_tensor) -> kT`` (name is the
    module's qualified name or the state-dict key), e.g. ``lambda name, conv: conv.kernel_size[0]``
    for I3D's cubic kernels.

    A video whose frames are all equal then gives at every frame the 2D network's response to that
    frame (exactly with ``time_padding=0``; with zero time padding the kT // 2 frames at each end see
    the padding, and stacked layers widen that border)."""
    if isinstance(module_or_state_dict, nn.Module):
        module = copy.deepcopy(module_or_state_dict)
        inflated = _inflate_module(module, "", time_kernel, time_padding)
        if inflated is not None:
            return inflated
        _inflate_children(module, "", time_kernel, time_padding)
        return module
    if not isinstance(module_or_state_dict, Mapping):
        raise TypeError(f"inflate_2d_to_3d: expected an nn.Module or a state dict, got "
                        f"{type(module_or_state_dict).__name__}")
    state: Dict[str, Tensor] = OrderedDict()
    for key, value in module_or_state_dict.items():
        if isinstance(value, Tensor) and value.dim() == 4:
            value = inflate_conv_weight(value, _time_kernel_for(time_kernel, key, value))
        state[key] = value.clone() if isinstance(value, Tensor) else value
    return state


# ------------------------------------------------------------------------------------------------
# I3D
# ------------------------------------------------------------------------------------------------

# Inception-v1 (GoogLeNet) Mixed block widths: (1×1, 3×3 reduce, 3×3, second 3×3 reduce, second 3×3,
# pool projection). In I3D both middle branches use 3×3×3 kernels.
MIXED_WIDTHS: Dict[str, Tuple[int, int, int, int, int, int]] = {
    "mixed_3b": (64, 96, 128, 16, 32, 32),
    "mixed_3c": (128, 128, 192, 32, 96, 64),
    "mixed_4b": (192, 96, 208, 16, 48, 64),
    "mixed_4c": (160, 112, 224, 24, 64, 64),
    "mixed_4d": (128, 128, 256, 24, 64, 64),
    "mixed_4e": (112, 144, 288, 32, 64, 64),
    "mixed_4f": (256, 160, 320, 32, 128, 128),
    "mixed_5b": (256, 160, 320, 32, 128, 128),
    "mixed_5c": (384, 192, 384, 48, 128, 128),
}


class Unit3d(nn.Sequential):
    """Conv3d (no bias), BatchNorm3d (eps 1e-3, as the TensorFlow original), ReLU; 'same'-size padding
    k // 2 (symmetric; TensorFlow pads the extra row of even totals at the end)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1):
        kernel = triple(kernel_size)
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=tuple(k // 2 for k in kernel),
                      bias=False),
            nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01),
            nn.ReLU(inplace=True))
        self.out_channels = out_channels


class InceptionBlock3d(nn.Module):
    """Inflated Inception (Mixed) block: four branches concatenated along channels — 1×1×1;
    1×1×1 → 3×3×3; 1×1×1 → 3×3×3; 3×3×3 max-pool (stride 1) → 1×1×1.
    ``[B, in, T, H, W] -> [B, b0 + b1 + b2 + b3, T, H, W]``."""

    def __init__(self, in_channels: int, widths: Tuple[int, int, int, int, int, int]):
        super().__init__()
        single, reduce_a, conv_a, reduce_b, conv_b, pool_projection = widths
        self.branch_1x1 = Unit3d(in_channels, single)
        self.branch_3x3 = nn.Sequential(Unit3d(in_channels, reduce_a), Unit3d(reduce_a, conv_a, 3))
        self.branch_3x3_second = nn.Sequential(Unit3d(in_channels, reduce_b), Unit3d(reduce_b, conv_b, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool3d(3, stride=1, padding=1), Unit3d(in_channels, pool_projection))
        self.out_channels = single + conv_a + conv_b + pool_projection

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch_1x1(x), self.branch_3x3(x), self.branch_3x3_second(x), self.branch_pool(x)],
                         dim=1)


class I3D(nn.Module):
    """Inflated Inception-v1. ``forward(video [B, 3, T, H, W]) -> [B, num_classes]``.

    Conv3d_1a 7×7×7 stride 2 (64); max-pool 1×3×3 stride (1, 2, 2); Conv3d_2b 1×1×1 (64); Conv3d_2c
    3×3×3 (192); max-pool 1×3×3 stride (1, 2, 2); Mixed 3b, 3c; max-pool 3×3×3 stride 2; Mixed
    4b–4f; max-pool 2×2×2 stride 2; Mixed 5b, 5c (1024 channels at T/8, H/32, W/32); average pool
    2×7×7 stride 1 (at 224²: over all of space; the kernel shrinks to the feature map for smaller
    inputs); dropout; 1×1×1 conv logits (with bias); mean over time. ``width_multiplier`` scales
    every width (1 = the paper's)."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3, dropout: float = 0.5,
                 width_multiplier: float = 1.0):
        super().__init__()

        def scaled(widths):
            return tuple(max(1, round(w * width_multiplier)) for w in widths)

        stem_widths = scaled((64, 64, 192))
        layers = OrderedDict([
            ("conv3d_1a", Unit3d(in_channels, stem_widths[0], 7, stride=2)),
            ("pool_2a", nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))),
            ("conv3d_2b", Unit3d(stem_widths[0], stem_widths[1], 1)),
            ("conv3d_2c", Unit3d(stem_widths[1], stem_widths[2], 3)),
            ("pool_3a", nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))),
        ])
        channels = stem_widths[2]
        pools_before = {"mixed_4b": ("pool_4a", nn.MaxPool3d(3, stride=2, padding=1)),
                        "mixed_5b": ("pool_5a", _WindowFittingMaxPool3d(2))}
        for name, widths in MIXED_WIDTHS.items():
            if name in pools_before:
                pool_name, pool = pools_before[name]
                layers[pool_name] = pool
            block = InceptionBlock3d(channels, scaled(widths))
            layers[name] = block
            channels = block.out_channels
        self.features = nn.Sequential(layers)
        self.dropout = nn.Dropout(dropout)
        self.logits = nn.Conv3d(channels, num_classes, 1)
        self.out_features = channels

    def forward(self, video: Tensor) -> Tensor:
        x = self.features(video)
        x = nn.functional.avg_pool3d(x, _fitted_window((2, 7, 7), x), stride=1)
        x = self.logits(self.dropout(x))  # [B, classes, T', H', W'] (H' = W' = 1 at 224²)
        return x.mean(dim=(2, 3, 4))


@register("i3d")
def i3d(num_classes: int = 400, in_channels: int = 3, frames: int = 64, height: int = 224, width: int = 224,
        dropout: float = 0.5, width_multiplier: float = 1.0) -> I3D:
    """I3D RGB network (Carreira & Zisserman 2017), trained on 64-frame 224² clips. Any T ≥ 1 and
    H, W ≥ 32 run (the last average pool adapts); ``width_multiplier`` shrinks it for tests."""
    return I3D(num_classes, in_channels, dropout, width_multiplier)


__all__ = ["inflate_conv_weight", "inflate_2d_to_3d", "MIXED_WIDTHS", "Unit3d", "InceptionBlock3d", "I3D", "i3d"]
