"""The model registry: ``@register("name")`` on a builder function, ``build(name, **kwargs)``."""
from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator: registers ``builder(**kwargs) -> nn.Module`` under ``name`` (unique)."""
    def wrap(builder: Callable[..., nn.Module]):
        if name in _BUILDERS:
            raise ValueError(f"fastvid.models: a model named {name!r} is registered already")
        _BUILDERS[name] = builder
        return builder
    return wrap


def list_models() -> List[str]:
    """Names of every registered model, sorted."""
    return sorted(_BUILDERS)


def build(name: str, **kwargs) -> nn.Module:
    """Builds the registered model ``name`` with the builder's keyword arguments."""
    if name not in _BUILDERS:
        raise ValueError(f"fastvid.models: unknown model {name!r}; registered: {', '.join(list_models())}")
    return _BUILDERS[name](**kwargs)
