"""Pure-PyTorch nonlocal attention: the oracle for tests and the fallback without `_C`.

Conventions shared by every backend:

* ``q`` ``[B, N, D]``, ``k`` ``[B, M, D]``, ``v`` ``[B, M, Dv]`` (heads folded into B by the caller);
* ``out = softmax(scale · q kᵀ, dim=-1) v`` ``[B, N, Dv]`` and ``lse`` ``[B, N]``, the per-row
  log-sum-exp of ``scale · q kᵀ`` (what the tiled kernels save for backward);
* bf16/fp16 inputs compute in fp32 and return the input dtype; ``lse`` is fp32 (fp64 for fp64).

This materialises the N×M affinity matrix: it is the naive computation the kernels replace.
"""
from __future__ import annotations

import torch


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def nonlocal_attention(q, k, v, scale: float):
    """Returns ``(out, lse)``."""
    acc = _compute_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.to(acc))
    return out.to(q.dtype), lse
