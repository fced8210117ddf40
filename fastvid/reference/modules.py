"""Plain-PyTorch twins of the fastvid layers, used by ``fastvid.convert(model, to="reference")``.

Each entry of ``TO_REFERENCE`` is (name, recognises(module), make(module)): ``make`` returns a
module built only from ``torch.nn`` (no fastvid op, no compiled extension) with the same parameters
and the same outputs.
"""
from __future__ import annotations

from typing import List

from torch import nn

from ..nn.conv3d import DepthwiseConv3d


def depthwise_to_conv3d(module: DepthwiseConv3d) -> nn.Conv3d:
    """``nn.Conv3d(C, m*C, k, groups=C)`` sharing ``module``'s weight and bias."""
    conv = nn.Conv3d(module.channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                     module.dilation, groups=module.channels, bias=module.bias is not None)
    conv.weight = module.weight
    conv.bias = module.bias
    return conv.train(module.training)


TO_REFERENCE: List = [
    ("depthwise_conv3d", lambda m: isinstance(m, DepthwiseConv3d), depthwise_to_conv3d),
]
