"""Separable 3D convolutions: depthwise, depthwise-separable and R(2+1)D.

``DepthwiseConv3d`` is a drop-in for ``nn.Conv3d(C, m*C, k, groups=C)``, a subclass of it: same ``weight``
``[m*C, 1, kT, kH, kW]`` and ``bias`` ``[m*C]`` names and shapes, so state dicts load both ways.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from .. import ops
from .._sizes import triple
from ._build import module_to_fill
from ._fx import fx_leaf

IntOrTriple = Union[int, Sequence[int]]


class DepthwiseConv3d(nn.Conv3d):
    """Channel-wise 3D convolution: output channel o convolves input channel o // channel_multiplier.

    An nn.Conv3d(channels, channel_multiplier * channels, ..., groups=channels) whose forward runs fastvid's
    kernels: code that walks a model for nn.Conv3d (weight initialisation, weight-decay groups, FLOP counters,
    fuse_conv_bn_eval) treats it as the convolution it replaced, with nn.Conv3d's attributes and initialisation."""

    def __init__(self, channels: int, kernel_size: IntOrTriple, stride: IntOrTriple = 1,
                 padding: Union[IntOrTriple, str] = 0, dilation: IntOrTriple = 1, bias: bool = True,
                 channel_multiplier: int = 1, device=None, dtype=None, padding_mode: str = "zeros"):
        if channels <= 0 or channel_multiplier <= 0:
            raise ValueError(f"channels and channel_multiplier must be positive, got {channels}, {channel_multiplier}")
        kernel_size, stride, dilation = triple(kernel_size), triple(stride), triple(dilation)
        if isinstance(padding, str):  # stays a string, as in nn.Conv3d (ops.depthwise_conv3d resolves it per call)
            ops.depthwise3d.check_padding_string("DepthwiseConv3d", padding, stride)
        else:
            padding = triple(padding)
        for name, value, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                                 ("dilation", dilation, 1)):
            if isinstance(value, str):
                continue
            if len(value) != 3 or any(v < low for v in value):
                raise ValueError(f"DepthwiseConv3d: {name} must be one int or a (T, H, W) triple, each >= {low}, "
                                 f"got {value}")
        if any(k > ops.depthwise3d.MAX_KERNEL_SIZE for k in kernel_size):  # (it raised at the first call)
            raise ValueError(f"DepthwiseConv3d: kernel_size must be at most {ops.depthwise3d.MAX_KERNEL_SIZE} along each "
                             f"dim (the kernels' limit; nn.Conv3d(groups=C) takes larger), got {kernel_size}")
        super().__init__(channels, channels * channel_multiplier, kernel_size, stride, padding, dilation, groups=channels,
                         bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.channels, self.channel_multiplier = channels, channel_multiplier

    def __setstate__(self, state):
        """Modules pickled before DepthwiseConv3d was an nn.Conv3d lack nn.Conv3d's own attributes."""
        super().__setstate__(state)
        if "in_channels" not in self.__dict__:  # nn.Conv3d's own record of these sizes, built on meta to copy from
            twin = nn.Conv3d(self.channels, self.channels * self.channel_multiplier, self.kernel_size, self.stride,
                             self.padding, self.dilation, groups=self.channels, device="meta")
            for name in ("in_channels", "out_channels", "groups", "transposed", "output_padding",
                         "_reversed_padding_repeated_twice"):
                setattr(self, name, getattr(twin, name))

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: one leaf node (nn/_fx.py)
            return fx_leaf(self, x)
        # The op reads the channel multiplier off the weight and the input (F.conv3d(groups=C) semantics):
        # an input with a divisor of the module's channels would run as another multiplier.
        if not torch.jit.is_tracing() and x.dim() in (4, 5) and x.shape[-4] != self.channels:
            raise ValueError(f"DepthwiseConv3d: expected input [B, {self.channels}, T, H, W] or [{self.channels}, T, H, "
                             f"W], got {tuple(x.shape)} ({x.shape[-4]} channels instead of {self.channels})")
        if self.padding_mode != "zeros":  # as nn.Conv3d does it: pad the input so, then convolve unpadded
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return ops.depthwise_conv3d(x, self.weight, self.bias, self.stride, 0, self.dilation)
        return ops.depthwise_conv3d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self):
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, channel_multiplier={self.channel_multiplier}, bias={self.bias is not None}"
                + (f", padding_mode={self.padding_mode!r}" if self.padding_mode != "zeros" else ""))

    @classmethod
    def from_conv3d(cls, conv: nn.Conv3d) -> "DepthwiseConv3d":
        """The DepthwiseConv3d equal to ``conv`` (which must have groups == in_channels), weights shared."""
        if not is_depthwise_conv3d(conv):
            raise ValueError(f"not a convertible depthwise nn.Conv3d: {conv}")
        check_parameters_shareable(conv)
        module = module_to_fill(cls, DepthwiseConv3d, conv.in_channels, conv.kernel_size, conv.stride,
                                _numeric_padding(conv), conv.dilation, bias=conv.bias is not None,
                                channel_multiplier=conv.out_channels // conv.in_channels)
        module.weight = conv.weight
        module.bias = conv.bias
        return module.train(conv.training)


def check_parameters_shareable(module: nn.Module) -> None:
    """Raises where ``module``'s weight or bias is not a parameter but recomputed each call: a converted twin
    (either way) shares the parameters, and a computed tensor would become a stale copy."""
    computed = [name for name in ("weight", "bias")
                if getattr(module, name) is not None and not isinstance(getattr(module, name), nn.Parameter)]
    if computed:
        raise ValueError(f"{type(module).__name__}: its {' and '.join(computed)} is recomputed each call (by "
                         "torch.nn.utils.prune, weight_norm or another parametrization), not a parameter; remove "
                         "that first (prune.remove, parametrize.remove_parametrizations) or convert before adding it")


def _numeric_padding(conv: nn.Conv3d) -> Optional[tuple]:
    """``conv.padding`` as one number per dimension, or None where no symmetric padding equals it:
    'valid' is 0; 'same' (stride 1) pads d·(k - 1) in all, half on each side, and PyTorch puts an odd
    total's extra element on the far side only."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0, 0)
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)


def _is_conv3d(module: nn.Module) -> bool:
    """An nn.Conv3d, or the class torch.nn.utils.parametrize makes of one (the same forward; its parametrized
    tensors computed on access)."""
    return type(module) is nn.Conv3d or (parametrize.is_parametrized(module) and type(module).__bases__ == (nn.Conv3d,))


def is_depthwise_conv3d(module: nn.Module) -> bool:
    """An nn.Conv3d (or a parametrized one: from_conv3d then says why it cannot share its weight) that
    DepthwiseConv3d reproduces exactly and its kernels run: groups == in_channels, zero padding given as
    numbers, 'valid' or a symmetric 'same', a floating weight, kernel sizes up to
    ``ops.depthwise3d.MAX_KERNEL_SIZE``."""
    return (_is_conv3d(module) and module.groups == module.in_channels
            and module.out_channels % module.in_channels == 0 and module.padding_mode == "zeros"
            and _numeric_padding(module) is not None and module.weight.is_floating_point()
            and all(k <= ops.depthwise3d.MAX_KERNEL_SIZE for k in module.kernel_size))


class SeparableConv3d(nn.Module):
    """Depthwise k×k×k convolution, optional norm and activation, then a pointwise 1×1×1 convolution
    (the depthwise-separable block of S3D / CSN / X3D-style networks)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTriple, stride: IntOrTriple = 1,
                 padding: IntOrTriple = 0, dilation: IntOrTriple = 1, bias: bool = True, channel_multiplier: int = 1,
                 norm: Optional[nn.Module] = None, activation: Optional[nn.Module] = None):
        super().__init__()
        self.depthwise = DepthwiseConv3d(in_channels, kernel_size, stride, padding, dilation, bias=bias,
                                         channel_multiplier=channel_multiplier)
        self.norm = norm if norm is not None else nn.Identity()
        self.activation = activation if activation is not None else nn.Identity()
        self.pointwise = nn.Conv3d(in_channels * channel_multiplier, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.activation(self.norm(self.depthwise(x))))


def r2plus1d_mid_channels(in_channels: int, out_channels: int, kernel_size: IntOrTriple = 3) -> int:
    """M = ⌊t·d²·N_in·N_out / (d²·N_in + t·N_out)⌋ (Tran et al. 2018): the (2+1)D block then has the
    parameter count of the full t×d×d convolution; at least 1 (the formula gives 0 for a few channels
    and a 1-wide kernel, and a block of 0 channels fails at its first call)."""
    t, d, _ = triple(kernel_size)
    return max(1, (t * d * d * in_channels * out_channels) // (d * d * in_channels + t * out_channels))


class Conv2Plus1d(nn.Sequential):
    """R(2+1)D factorisation of a t×d×d convolution: spatial (1, d, d) conv to M channels, BatchNorm,
    ReLU, temporal (t, 1, 1) conv. Spatial stride on the first conv, temporal stride on the second."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTriple = 3, stride: IntOrTriple = 1,
                 mid_channels: Optional[int] = None):
        t, d, d2 = triple(kernel_size)
        if d != d2:
            raise ValueError(f"Conv2Plus1d needs a square spatial kernel, got {kernel_size}")
        st, sh, sw = triple(stride)
        mid = mid_channels if mid_channels is not None else r2plus1d_mid_channels(in_channels, out_channels,
                                                                                 kernel_size)
        super().__init__(
            nn.Conv3d(in_channels, mid, (1, d, d), stride=(1, sh, sw), padding=(0, d // 2, d // 2), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, out_channels, (t, 1, 1), stride=(st, 1, 1), padding=(t // 2, 0, 0), bias=False),
        )
        self.in_channels, self.out_channels, self.mid_channels = in_channels, out_channels, mid
