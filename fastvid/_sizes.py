"""Size arguments (kernel_size, stride, padding, dilation, pool windows) as tuples of Python ints: one
integer for every dimension or one per dimension, as torch.nn's layers take them. Integers of any
kind (numpy's too, which nn.Conv3d takes) become Python ints, so the shape checks and the C++ schemas
see plain ints."""
from __future__ import annotations

import numbers


def ntuple(value, n: int) -> tuple:
    """``value``, an integer or a sequence of ``n`` values, as an ``n``-tuple (a sequence of another length
    stays as it is, for the caller's check to name, as nn.Conv3d's constructor keeps it)."""
    if type(value) is int:  # the common cases first: the ABC check below costs ~0.5 us per value, per op call
        return (value,) * n
    if isinstance(value, numbers.Integral):
        return (int(value),) * n
    values = tuple(value)
    if not all(type(v) is int for v in values):
        values = tuple(int(v) if isinstance(v, numbers.Integral) else v for v in values)
    return values


def pair(value) -> tuple:
    return ntuple(value, 2)


def triple(value) -> tuple:
    return ntuple(value, 3)
