"""fastvid.info(): what is compiled and usable on this machine."""
import platform

import torch

from . import _backend
from ._version import __version__


def info() -> dict:
    """A dict saying what is compiled and usable (printed by ``python -m fastvid info``)."""
    return {
        "version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_kernels": _backend.cpu_kernels(),
        "cuda_compiled": _backend.cuda_compiled(),
        "cuda_archs": list(_backend.cuda_archs()),
        "cuda_available": _backend.cuda_compiled() and torch.cuda.is_available(),
        "triton_available": _backend.triton_usable(),
        "triton_interpret": _backend.triton_interpret(),
        "backend": _backend.get_backend(),
        "threads": torch.get_num_threads(),
        "extension_error": None if _backend.EXTENSION_ERROR is None else str(_backend.EXTENSION_ERROR),
    }
