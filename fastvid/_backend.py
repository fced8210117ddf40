"""Which implementation runs an op: 'auto' | 'cpu' | 'cuda' | 'triton' | 'reference'.

Each backend declares what it supports and answers ``not_supported_reasons(tensors)``. 'auto'
takes the compiled kernel for the tensors' device (then Triton on CUDA, then the reference);
forcing a backend that cannot run the inputs raises an error listing its reasons. The choice is
made at call time, per op call, so the same model can move between devices.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_current = contextvars.ContextVar("fastvid_backend", default="auto")

try:  # the compiled extension registers torch.ops.fastvid.* as a side effect of loading
    from fastvid import _C  # noqa: F401
    EXTENSION_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only in a build without _C
    EXTENSION_ERROR = exc
    warnings.warn(f"fastvid: compiled kernels unavailable ({exc}); ops fall back to the pure-PyTorch "
                  "reference implementation (fastvid/reference). Rebuild with "
                  "`pip install --no-build-isolation -e .` to get the fast kernels.", stacklevel=2)


def cpu_kernels() -> bool:
    return EXTENSION_ERROR is None


@functools.lru_cache(None)
def cuda_compiled() -> bool:
    return cpu_kernels() and torch._C._dispatch_has_kernel_for_dispatch_key("fastvid::lstm_cell", "CUDA")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable() -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    return triton_importable() and (torch.cuda.is_available() or triton_interpret())


def set_backend(name: str) -> None:
    """Select the backend for all later calls in this context ('auto' restores the default)."""
    _current.set(_check_name(name))


def get_backend() -> str:
    return _current.get()


@contextlib.contextmanager
def backend(name: str):
    """``with fastvid.backend("reference"): ...`` runs the block on that backend."""
    token = _current.set(_check_name(name))
    try:
        yield
    finally:
        _current.reset(token)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"fastvid backend must be one of {BACKENDS}, got {name!r}")
    return name


def _tensors(tensors):
    """(name, tensor) pairs from a {name: tensor} dict or a list."""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    return [(name, t) for name, t in items if isinstance(t, torch.Tensor)]


def _devices(tensors):
    return {t.device.type for _, t in _tensors(tensors)}


def _device_report(tensors):
    return ", ".join(f"{name} on {t.device}" for name, t in _tensors(tensors))


def not_supported_reasons(name: str, tensors) -> list[str]:
    """Why backend `name` cannot run an op on these tensors (empty list: it can)."""
    devices = _devices(tensors)
    reasons = []
    if len(devices) > 1:
        reasons.append(f"tensors are on several devices ({_device_report(tensors)})")
    if name == "cpu":
        if not cpu_kernels():
            reasons.append(f"fastvid._C is not built ({EXTENSION_ERROR})")
        if devices - {"cpu"}:
            reasons.append(f"cpu kernels need CPU tensors, got {sorted(devices)}")
    elif name == "cuda":
        if not cuda_compiled():
            reasons.append("fastvid._C was built without CUDA kernels")
        if devices - {"cuda"}:
            reasons.append(f"cuda kernels need CUDA tensors, got {sorted(devices)}")
    elif name == "triton":
        if not triton_importable():
            reasons.append("triton is not installed")
        if "cpu" in devices and not triton_interpret():
            reasons.append("triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        if devices - {"cpu", "cuda"}:
            reasons.append(f"triton runs on CUDA tensors, got {sorted(devices)}")
    return reasons


def resolve(tensors) -> str:
    """The concrete backend ('cpu', 'cuda', 'triton' or 'reference') for an op on `tensors`
    (a {argument name: tensor} dict, so errors can name the arguments, or a list)."""
    name = _current.get()
    if name == "reference":
        return name
    if name != "auto":
        reasons = not_supported_reasons(name, tensors)
        if reasons:
            raise RuntimeError(f"fastvid backend {name!r} cannot run these inputs: " + "; ".join(reasons))
        return name
    devices = _devices(tensors)
    preferred = ["cuda", "triton"] if "cuda" in devices else ["cpu"]
    for candidate in preferred:
        if not not_supported_reasons(candidate, tensors):
            return candidate
    if len(devices) > 1:
        raise RuntimeError(f"fastvid: tensors are on several devices ({_device_report(tensors)}); "
                           "move them to one device")
    return "reference"
