"""Modules built only to receive another module's parameters (conversions, imports)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def built_without_drawing(build: Callable[[], nn.Module], device=None) -> nn.Module:
    """``build()``'s module, every parameter and buffer zero, on ``device`` (default: the CPU): constructed on the
    meta device, so its initialisation draws nothing from the global random generator that a seeded caller
    and its other threads use. The caller overwrites the parameters. (Saving and restoring the generator
    around a normal construction, torch.random.fork_rng, rewound the draws other threads made meanwhile.)"""
    with torch.device("meta"):
        module = build()
    module.to_empty(device=device if device is not None else "cpu")
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            tensor.zero_()
    return module
