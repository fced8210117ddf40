"""Modules built only to receive another module's parameters (conversions, imports)."""
from __future__ import annotations

import torch
from torch import nn


def module_to_fill(cls: type, filled_class: type, *args, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)``, built to receive another module's parameters; ``filled_class`` is the class
    whose every parameter and buffer the caller sets. ``cls`` being that class, the module is built on the
    meta device and zero-filled: its initialisation draws nothing from the global random generator that a
    seeded caller and its other threads use (saving and restoring the generator around a normal construction,
    torch.random.fork_rng, rewound the draws other threads made meanwhile). A subclass may hold state of its
    own that the caller does not set: it is built by its constructor, drawing as constructing it does."""
    if cls is not filled_class:
        return cls(*args, **kwargs)
    with torch.device("meta"):
        module = cls(*args, **kwargs)
    module.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            tensor.zero_()
    return module
