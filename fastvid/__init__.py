"""fastvid: fused temporal layers for video networks (ConvLSTM/ConvGRU, separable 3D conv,
nonlocal attention) as PyTorch custom ops with C++, CUDA and Triton kernels."""
from ._version import __version__
from ._backend import backend, get_backend, set_backend
from . import ops  # noqa: F401  (registers fake kernels and autograd of the custom ops)
from . import nn  # noqa: F401
from . import models  # noqa: F401
from .convert import convert
from ._info import info
from ._memory import empty_cpu_cache

__all__ = ["__version__", "backend", "get_backend", "set_backend", "info", "empty_cpu_cache", "ops", "nn", "models",
           "convert"]
