"""Pure-PyTorch depthwise 3D convolution: the oracle for tests and the fallback without `_C`.

Conventions shared by every backend:

* ``input`` is ``[B, C, T, H, W]``; ``weight`` is ``[C*m, 1, kT, kH, kW]`` with channel multiplier
  m: output channel o reads input channel ``o // m`` (as ``nn.Conv3d(C, m*C, k, groups=C)``).
* ``stride``, ``padding`` and ``dilation`` are ints or (T, H, W) triples; zero padding.
* Low-precision inputs (bf16/fp16) accumulate in fp32 and store in the input dtype.
"""
from __future__ import annotations

import torch.nn.functional as F


def _triple(v):
    return (v, v, v) if isinstance(v, int) else tuple(v)


def depthwise_conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1):
    """``F.conv3d(input, weight, bias, stride, padding, dilation, groups=C)``."""
    return F.conv3d(input, weight, bias, _triple(stride), _triple(padding), _triple(dilation), groups=input.shape[1])
