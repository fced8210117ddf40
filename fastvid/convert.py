"""Drop-in replacement of layers, weights kept, both ways.

``fastvid.convert(model)`` walks the module tree and replaces every module that a converter in
``CONVERTERS`` recognises by the fastvid layer computing the same function (``nn.Conv3d`` with
``groups == in_channels`` → ``DepthwiseConv3d``; nonlocal blocks → ``NonLocalBlock``).
``fastvid.convert(model, to="reference")`` goes back: every fastvid layer becomes plain PyTorch
modules with the same parameters (``fastvid/convert_reference.py``), for export and for users
without the compiled extension.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, List, Optional, Tuple

from torch import nn

from .nn.conv3d import DepthwiseConv3d, is_depthwise_conv3d
from .nn.nonlocal_block import nonlocal_from_module

# (name, replacement(module) -> the module to put in its place, or None where it does not apply),
# tried in order. One call decides and builds: the nonlocal converter's check is the probe itself.
Converter = Tuple[str, Callable[[nn.Module], Optional[nn.Module]]]


def _depthwise(module: nn.Module) -> Optional[nn.Module]:
    return DepthwiseConv3d.from_conv3d(module) if is_depthwise_conv3d(module) else None


CONVERTERS: List[Converter] = [
    ("nonlocal_block", nonlocal_from_module),
    ("depthwise_conv3d", _depthwise),
]

TARGETS = ("fastvid", "reference")


def convert(model: nn.Module, inplace: bool = False, to: str = "fastvid") -> nn.Module:
    """Returns ``model`` with its layers replaced (outputs equal within float tolerance, parameters
    kept). ``to="fastvid"``: native layers → fastvid layers; ``to="reference"``: fastvid layers →
    plain PyTorch modules. With ``inplace=False`` the model is deep-copied first."""
    if to not in TARGETS:
        raise ValueError(f"fastvid.convert: to must be one of {TARGETS}, got {to!r}")
    if to == "reference":
        from .convert_reference import TO_REFERENCE as converters
    else:
        converters = CONVERTERS
    if not inplace:
        model = copy.deepcopy(model)
    # to="reference" must replace every fastvid layer (export needs them all), so a failure raises;
    # to="fastvid" leaves a module it cannot check native, with a warning.
    tolerant = to == "fastvid"
    replacement = _replacement(model, converters, "", tolerant)
    if replacement is not None:
        return replacement
    _convert_children(model, converters, "", tolerant)
    return model


def _replacement(module: nn.Module, converters: List[Converter], path: str, tolerant: bool) -> Optional[nn.Module]:
    for name, replace in converters:
        try:
            new = replace(module)
        except Exception as error:
            if not tolerant:
                raise
            warnings.warn(f"fastvid.convert: {path or 'the model'} ({type(module).__name__}) left unconverted: the "
                          f"{name} converter raised {type(error).__name__}: {error}", RuntimeWarning, stacklevel=2)
            return None
        if new is not None:
            return new
    return None


def _convert_children(module: nn.Module, converters: List[Converter], prefix: str, tolerant: bool) -> None:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        replacement = _replacement(child, converters, path, tolerant)
        if replacement is not None:
            setattr(module, name, replacement)
        else:
            _convert_children(child, converters, path, tolerant)
