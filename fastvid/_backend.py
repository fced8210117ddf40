"""Which implementation runs an op: 'auto' | 'cpu' | 'cuda' | 'triton' | 'reference'.

Each backend declares what it supports and answers ``not_supported_reasons(tensors)``. 'auto'
takes the compiled kernel for the tensors' device (then Triton on CUDA, then the reference);
forcing a backend that cannot run the inputs raises an error listing its reasons. The choice is
made at call time, per op call, so the same model can move between devices.

Two levels choose the backend: ``set_backend(name)`` sets the process-wide default, seen by every thread
(DataParallel replicas, thread pools, DataLoader threads); ``with backend(name):`` overrides it for the
current context only (this thread or asyncio task; threads started inside the block do not inherit it).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import threading
import warnings

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_process_default = "auto"                       # set_backend(): every thread sees it
_override = contextvars.ContextVar("fastvid_backend_override", default=None)  # backend(): this context only

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


@functools.lru_cache(None)
def cuda_archs() -> tuple[str, ...]:
    """The CUDA archs compiled into fastvid._C: SASS 'sm_XY' and PTX 'compute_XY' (empty: none)."""
    if not cpu_kernels():
        return ()
    return tuple(a for a in getattr(_C, "cuda_archs", "").split(",") if a)


def _arch_number(arch: str) -> int:
    return int("".join(ch for ch in arch.split("_", 1)[1] if ch.isdigit()))


def arch_serves(archs, capability: tuple[int, int]) -> bool:
    """Whether a device of compute capability (major, minor) can run code built for `archs`: SASS of the
    same major version and a minor <= the device's (binary compatible), or PTX of an arch <= the device's
    (the driver JIT-compiles it). Arch-specific 'a' variants run only on their exact arch."""
    major, minor = capability
    device = major * 10 + minor
    for arch in archs:
        number = _arch_number(arch)
        if arch.startswith("sm_"):
            if arch.endswith("a") and number == device:
                return True
            if not arch.endswith("a") and number // 10 == major and number % 10 <= minor:
                return True
        elif arch.startswith("compute_") and not arch.endswith("a") and number <= device:
            return True
    return False


@functools.lru_cache(None)
def _device_capability(device: torch.device) -> tuple[int, int]:
    """A GPU's compute capability never changes: read it once per device, not on every op call."""
    return torch.cuda.get_device_capability(device)


def _cuda_capabilities(tensors) -> dict:
    """{device: (major, minor)} of the CUDA tensors among `tensors`."""
    devices = {t.device for _, t in _tensors(tensors) if t.device.type == "cuda"}
    return {d: _device_capability(d) for d in devices}


_warned_capabilities: set = set()
_warn_lock = threading.Lock()


def _warn_unserved_once(capability, archs) -> None:
    with _warn_lock:
        if capability in _warned_capabilities:
            return
        _warned_capabilities.add(capability)
    warnings.warn(f"fastvid: the compiled CUDA kernels ({', '.join(archs) or 'none'}) cannot run on this GPU "
                  f"(compute capability {capability[0]}.{capability[1]}); using Triton or the reference "
                  f"implementation instead. Rebuild for it with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]} "
                  "pip install --no-build-isolation .", RuntimeWarning, stacklevel=4)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable() -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    return triton_importable() and (torch.cuda.is_available() or triton_interpret())


def set_backend(name: str) -> None:
    """Set the process-wide default backend, seen by every thread ('auto' restores the default).
    A ``with backend(...)`` block still overrides it in its own context."""
    global _process_default
    _process_default = _check_name(name)


# torch.compile: torch 2.14's dynamo reads a ContextVar at trace time and guards on its value; 2.11's
# cannot trace ContextVar.get at all (seen on the GPU image), so there the override is read once per
# trace as a constant, without a guard (versions between 2.11 and 2.14 are not known: they take this path).
_DYNAMO_GUARDS_CONTEXTVARS = torch.__version__ >= "2.14"


def _override_as_traced():
    return _override.get()


if not _DYNAMO_GUARDS_CONTEXTVARS:  # only then: the decorator imports torch._dynamo (~1 s; it needs a writable temp dir)
    _override_as_traced = torch.compiler.assume_constant_result(_override_as_traced)


def get_backend() -> str:
    """The backend in force here: this context's ``backend(...)`` override, else the process default."""
    if not _DYNAMO_GUARDS_CONTEXTVARS and torch.compiler.is_compiling():
        override = _override_as_traced()
    else:
        override = _override.get()
    return _process_default if override is None else override


@contextlib.contextmanager
def backend(name: str):
    """``with fastvid.backend("reference"): ...`` runs the block on that backend, in this context only
    (this thread or asyncio task); other threads keep the process default of ``set_backend``."""
    token = _override.set(_check_name(name))
    try:
        yield
    finally:
        _override.reset(token)


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


def _forward_ad_tangents(tensors) -> list[str]:
    """The arguments that carry a forward-mode AD tangent (torch.func.jvp / jacfwd, torch.autograd.forward_ad).
    The kernels' autograd is backward-only, and where no input requires grad PyTorch runs a
    torch.library.register_autograd op (the cell, attention and Triton ops) without its autograd: the
    result came back with no tangent, read as zero (torch 2.14)."""
    if getattr(torch.autograd.forward_ad, "_current_level", 0) < 0:  # no dual level entered: nothing to look at
        return []
    return [name for name, t in _tensors(tensors) if torch.autograd.forward_ad.unpack_dual(t).tangent is not None]


def in_func_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) is active. torch._C._functorch: PyTorch has no
    public test; without it, False. Not while dynamo traces (it cannot trace the test, and handles
    transforms itself)."""
    if torch.compiler.is_compiling():
        return False
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _grad_transformed(tensors) -> list[str]:
    """The arguments a torch.func gradient transform (grad, vjp, jacrev, functional training loops) traces: the
    kernels' autograd (C++ autograd functions, torch.library registrations) cannot run under it ("must override
    the setup_context staticmethod", "cannot use C++ torch::autograd::Function with functorch transforms").
    (torch._C._functorch, as in_func_transform: without it, nothing is found.)"""
    tracked = getattr(getattr(torch._C, "_functorch", None), "is_gradtrackingtensor", None)
    if tracked is None or not in_func_transform():
        return []
    return [name for name, t in _tensors(tensors) if tracked(t)]


def not_supported_reasons(name: str, tensors) -> list[str]:
    """Why backend `name` cannot run an op on these tensors (empty list: it can)."""
    devices = _devices(tensors)
    reasons = []
    if len(devices) > 1:
        reasons.append(f"tensors are on several devices ({_device_report(tensors)})")
    tangents = _forward_ad_tangents(tensors)
    if tangents:
        reasons.append(f"{', '.join(map(str, tangents))} carry forward-mode AD tangents (torch.func.jvp / jacfwd, "
                       "torch.autograd.forward_ad): the kernels have no forward-mode derivative; the 'reference' "
                       "backend (pure PyTorch) has one")
    traced = _grad_transformed(tensors)
    if traced:
        reasons.append(f"{', '.join(map(str, traced))} are traced by a torch.func gradient transform (grad / vjp / "
                       "jacrev): the kernels' autograd cannot run under it; the 'reference' backend (pure PyTorch) "
                       "can")
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
        elif cuda_compiled():
            for device, capability in _cuda_capabilities(tensors).items():
                if not arch_serves(cuda_archs(), capability):
                    reasons.append(f"no compiled kernel image serves {device} (compute capability "
                                   f"{capability[0]}.{capability[1]}; built for {', '.join(cuda_archs())})")
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
    name = get_backend()
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
        if candidate == "cuda" and cuda_compiled() and devices == {"cuda"}:
            for capability in set(_cuda_capabilities(tensors).values()):
                if not arch_serves(cuda_archs(), capability):
                    _warn_unserved_once(capability, cuda_archs())
    if len(devices) > 1:
        raise RuntimeError(f"fastvid: tensors are on several devices ({_device_report(tensors)}); "
                           "move them to one device")
    return "reference"
