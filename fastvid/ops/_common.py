"""Helpers shared by the op families' Python side (fake kernels, autograd, autocast)."""
from __future__ import annotations

import torch
from torch import Tensor


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for the device type; devices without autocast (meta: shape inference) never."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_inputs(device_type: str, *tensors):
    """Under autocast, cast the floating inputs of an op that runs in the autocast dtype to it; fp64 ones
    stay fp64, as autocast leaves them for PyTorch's own ops (an fp64 model runs in fp64 under it)."""
    if not autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def require_tensors(op: str, **arguments) -> None:
    """A TypeError naming the argument where a required tensor argument is something else (before, a list or
    None reached attribute lookups: "'list' object has no attribute 'device'")."""
    for name, value in arguments.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"fastvid.{op}: {name} must be a Tensor, got {type(value).__name__}")


def check_one_device(op: str, **arguments) -> None:
    """Fake kernels run for meta/fake inputs; like ATen's meta functions they reject mixed devices."""
    devices = {name: t.device for name, t in arguments.items() if isinstance(t, Tensor)}
    if len(set(devices.values())) > 1:
        raise RuntimeError(f"fastvid.{op}: all tensors must be on one device, got "
                           + ", ".join(f"{name} on {d}" for name, d in devices.items()))


def double_backward_unsupported(name: str):
    """Autograd formula for a *_backward op: differentiating it raises instead of returning wrong
    second derivatives (torchvision's habit)."""
    def backward(ctx, *grads):
        raise RuntimeError(f"fastvid.{name}: double backward is not supported")
    return backward
