"""Drop-in replacement of native layers in a user's model by fastvid layers, weights kept.

``fastvid.convert(model)`` walks the module tree and replaces every module that a registered
converter recognises. Today: ``nn.Conv3d`` with ``groups == in_channels`` → ``DepthwiseConv3d``.
Later conversions (nonlocal blocks, back to plain PyTorch) add entries to ``CONVERTERS``.
"""
from __future__ import annotations

import copy
from typing import Callable, List, Tuple

from torch import nn

from .nn.conv3d import DepthwiseConv3d, is_depthwise_conv3d

# (name, recognises(module) -> bool, convert(module) -> nn.Module), tried in order.
CONVERTERS: List[Tuple[str, Callable[[nn.Module], bool], Callable[[nn.Module], nn.Module]]] = [
    ("depthwise_conv3d", is_depthwise_conv3d, DepthwiseConv3d.from_conv3d),
]


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Returns ``model`` with native layers replaced by fastvid ones (outputs equal within float
    tolerance, parameters kept). With ``inplace=False`` the model is deep-copied first."""
    if not inplace:
        model = copy.deepcopy(model)
    for _, recognises, make in CONVERTERS:
        if recognises(model):
            return make(model)
    _convert_children(model)
    return model


def _convert_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        for _, recognises, make in CONVERTERS:
            if recognises(child):
                setattr(module, name, make(child))
                break
        else:
            _convert_children(child)
