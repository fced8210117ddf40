"""Reference video models from the seed papers, built only from ``torch.nn`` and ``fastvid.nn``
layers. ``list_models()`` names them, ``build(name, **kwargs)`` builds one.

Input convention: videos are ``[B, C, T, H, W]`` (channels, time, height, width)."""
from ._registry import build, list_models, register  # noqa: F401
from . import fusion, c3d, two_stream, heads  # noqa: F401,E402  (register their models)
from . import recurrent, videolstm  # noqa: F401,E402
from . import i3d, r2plus1d, x3d, resnet3d  # noqa: F401,E402
from . import forecaster  # noqa: F401,E402
from .i3d import inflate_2d_to_3d  # noqa: E402

__all__ = ["build", "list_models", "register", "inflate_2d_to_3d"]
