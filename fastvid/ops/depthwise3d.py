"""Depthwise 3D convolution: functional API and the Python side of the custom ops.

``torch.ops.fastvid.depthwise_conv3d`` / ``depthwise_conv3d_backward`` (schemas in csrc/ops.cpp,
kernels in csrc/depthwise3d/, autograd in csrc/autograd.cpp) get fake kernels here; the public
:func:`depthwise_conv3d` applies autocast and picks the backend (fastvid._backend).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from .. import _backend
from .._sizes import triple
from ._common import autocast_inputs, check_one_device, require_tensors
from ..reference import depthwise3d as ref

__all__ = ["depthwise_conv3d", "MAX_KERNEL_SIZE"]

# Largest kernel extent along each of T, H, W that the kernels take (kMaxKernel in
# csrc/depthwise3d/depthwise3d_ops.cpp, MAX_KERNEL in triton_kernels/depthwise3d.py).
MAX_KERNEL_SIZE = 7


def _triple(v):
    """A size argument as a (T, H, W) triple; a one-element sequence counts for all three, as F.conv3d takes it."""
    v = triple(v)
    return v * 3 if len(v) == 1 else v


PADDING_STRINGS = ("same", "valid")


def check_padding_string(who: str, padding: str, stride) -> None:
    """``padding`` as F.conv3d takes a string: 'valid', or 'same' with stride 1 (PyTorch's rule)."""
    if padding not in PADDING_STRINGS:
        raise ValueError(f"{who}: padding must be 'same', 'valid', one int or a (T, H, W) triple, got {padding!r}")
    if padding == "same" and any(s != 1 for s in _triple(stride)):
        raise ValueError(f"{who}: padding='same' is not supported for strided convolutions (as in F.conv3d), "
                         f"got stride {_triple(stride)}")


def _resolve_padding_string(input: Tensor, weight: Tensor, padding: str, dilation):
    """(input, padding triple) equal to F.conv3d's string ``padding``: 'valid' pads nothing; 'same' pads d·(k − 1)
    in each dimension, half before and half after, and where that total is odd PyTorch puts the extra
    element after: that element is padded onto the input here (a copy, as F.conv3d makes one), the rest
    is the kernels' symmetric padding."""
    if padding == "valid":
        return input, (0, 0, 0)
    if not isinstance(weight, Tensor) or weight.dim() != 5 or input.dim() != 5:  # the shape check says what is wrong
        return input, (0, 0, 0)
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    extra = [t % 2 for t in totals]
    if any(extra):  # F.pad's order: last dimension first, (before, after) each
        input = F.pad(input, (0, extra[2], 0, extra[1], 0, extra[0]))
    return input, tuple(t // 2 for t in totals)


def _channels_last(input: Tensor) -> bool:
    """Output layout rule, mirror of channels_last() in depthwise3d_ops.cpp: channels_last_3d when the
    input has several channels, more than one position and unit channel stride; else contiguous."""
    _B, C, T, H, W = input.shape
    return C > 1 and input.stride(1) == 1 and T * H * W > 1


def _format(input: Tensor):
    return torch.channels_last_3d if _channels_last(input) else torch.contiguous_format


def _output_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


_MAX_KERNEL = 7  # kMaxKernel in csrc/depthwise3d/depthwise3d_ops.cpp


def _check_shapes(op, input, weight, stride, padding, dilation):
    """The fake kernels' share of the C++ kernels' check_geometry (depthwise3d_ops.cpp): under torch.compile
    and on meta tensors the same refusals, instead of a negative output size or an index error later."""
    if input.dim() != 5:
        raise ValueError(f"fastvid.{op}: input must be [B, C, T, H, W], got shape {tuple(input.shape)}")
    if input.shape[1] == 0 or weight.dim() != 5 or weight.shape[1] != 1 or weight.shape[0] == 0 \
            or weight.shape[0] % input.shape[1] != 0:
        raise ValueError(f"fastvid.{op}: weight must be [m*C, 1, kT, kH, kW] with C = {input.shape[1]}, "
                         f"got shape {tuple(weight.shape)}")
    for name, values, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(values) != 3 or any(v < low for v in values):
            raise ValueError(f"fastvid.{op}: {name} must have 3 values (T, H, W), each >= {low}, got {list(values)}")
    for d, dim in enumerate("THW"):
        k, n = weight.shape[2 + d], input.shape[2 + d]
        if not 1 <= k <= _MAX_KERNEL:
            raise ValueError(f"fastvid.{op}: weight's kernel size along {dim} must be 1..{_MAX_KERNEL}, got {k}")
        extent = dilation[d] * (k - 1) + 1
        if n == 0 or extent > n + 2 * padding[d]:
            raise ValueError(f"fastvid.{op}: kernel size along {dim} ({k}, dilated to {extent}) is larger than the "
                             f"padded input ({n} + 2*{padding[d]} = {n + 2 * padding[d]})")


# ------------------------------------------------------------- fake kernels (the autograd kernels: csrc/autograd.cpp)
if _backend.cpu_kernels():  # the C++ ops exist only when fastvid._C loaded
    ops = torch.ops.fastvid

    @torch.library.register_fake("fastvid::depthwise_conv3d")
    def _(input, weight, bias, stride, padding, dilation):
        check_one_device("depthwise_conv3d", input=input, weight=weight, bias=bias)
        _check_shapes("depthwise_conv3d", input, weight, stride, padding, dilation)
        B = input.shape[0]
        out = [_output_size(input.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d])
               for d in range(3)]
        return torch.empty(B, weight.shape[0], *out, dtype=input.dtype, device=input.device,
                           memory_format=_format(input))

    @torch.library.register_fake("fastvid::depthwise_conv3d_backward")
    def _(grad_output, input, weight, stride, padding, dilation, output_mask):
        check_one_device("depthwise_conv3d_backward", grad_output=grad_output, input=input, weight=weight)
        _check_shapes("depthwise_conv3d_backward", input, weight, stride, padding, dilation)
        empty = input.new_empty(0)
        grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device,
                                 memory_format=_format(input)) if output_mask[0] else empty
        grad_weight = torch.empty(weight.shape, dtype=input.dtype, device=input.device) if output_mask[1] \
            else input.new_empty(0)
        grad_bias = input.new_empty(weight.shape[0]) if output_mask[2] else input.new_empty(0)
        return grad_input, grad_weight, grad_bias


def _triton():
    from ..triton_kernels import depthwise3d as tk  # imported lazily: triton import is slow
    return tk


# ------------------------------------------------------------------------------ public op
def depthwise_conv3d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                     dilation=1) -> Tensor:
    """Depthwise 3D convolution, ``F.conv3d(input, weight, bias, stride, padding, dilation, groups=C)``.

    ``input`` ``[B, C, T, H, W]`` (NCDHW or channels_last_3d: the CPU kernel prefers channels_last_3d
    and returns its output in the input's layout) or unbatched ``[C, T, H, W]``, ``weight`` ``[m*C, 1, kT, kH, kW]`` (channel
    multiplier m; kernel sizes up to 7), ``bias`` ``[m*C]`` or None; ``stride``, ``padding`` and
    ``dilation`` are ints or (T, H, W) triples; ``padding`` may also be 'same' (stride 1) or 'valid', as
    in F.conv3d."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(depthwise_conv3d, (input, weight, bias), input, weight, bias, stride, padding,
                                     dilation)
    require_tensors("depthwise_conv3d", input=input)
    if input.dim() == 4:  # unbatched [C, T, H, W], as F.conv3d takes it
        return depthwise_conv3d(input.unsqueeze(0), weight, bias, stride, padding, dilation).squeeze(0)
    stride, dilation = _triple(stride), _triple(dilation)
    if isinstance(padding, str):
        check_padding_string("fastvid.depthwise_conv3d", padding, stride)
        input, padding = _resolve_padding_string(input, weight, padding, dilation)
    padding = _triple(padding)
    for name, value, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(value) != 3 or any(v < low for v in value):  # checked here for every backend, not only the kernels
            raise ValueError(f"fastvid.depthwise_conv3d: {name} must be one int or a (T, H, W) triple, each >= {low}, "
                             f"got {value}")
    input, weight, bias = autocast_inputs(input.device.type, input, weight, bias)
    which = _backend.resolve({"input": input, "weight": weight, "bias": bias})
    if which in ("cpu", "cuda"):
        return torch.ops.fastvid.depthwise_conv3d(input, weight, bias, stride, padding, dilation)
    if which == "triton":  # contiguous NCDHW output
        return _triton().depthwise_conv3d(input, weight, bias, stride, padding, dilation)
    return ref.depthwise_conv3d(input, weight, bias, stride, padding, dilation)
