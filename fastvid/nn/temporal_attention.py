"""Attention of query states over a sequence of states (the temporal attention of the seed papers'
LSTM models: a decoder/top-LSTM state attending over the per-frame states), with the three score
functions of Luong et al. 2015:

* ``dot``:     score(q, k) = qᵀk
* ``general``: score(q, k) = qᵀ W k  (a learnable weighted dot product)
* ``concat``:  score(q, k) = vᵀ tanh(W_q q + W_k k)

weights = softmax over the T states, context = Σ_t weights_t · values_t. ``dot`` and ``general`` run
on fastvid's tiled attention kernel (``ops.nonlocal_attention`` with scale 1; ``general`` folds W
into the queries); ``concat`` is not a dot product, so its [B, N, T] scores are formed explicitly
(T, the number of time steps, is small).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ._fx import fx_leaf

SCORES = ("dot", "general", "concat")


class TemporalAttention(nn.Module):
    """``forward(query, keys, values=None, return_weights=False)``.

    query ``[B, Dq]`` (one state) or ``[B, N, Dq]`` (N query states); keys ``[B, T, Dk]``; values
    ``[B, T, Dv]`` (default: the keys). Returns the context ``[B, Dv]`` / ``[B, N, Dv]`` and, with
    ``return_weights``, the attention weights ``[B, T]`` / ``[B, N, T]`` (each row sums to 1).
    ``dot`` needs Dq == Dk; ``general`` has ``weight`` [Dq, Dk]; ``concat`` has ``query_proj``,
    ``key_proj`` (→ ``attention_dim``) and ``score_vector`` [attention_dim]."""

    def __init__(self, query_dim: int, key_dim: Optional[int] = None, score: str = "dot",
                 attention_dim: Optional[int] = None):
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"TemporalAttention: score must be one of {SCORES}, got {score!r}")
        key_dim = query_dim if key_dim is None else key_dim
        if score == "dot" and key_dim != query_dim:
            raise ValueError(f"TemporalAttention(score='dot') needs query_dim == key_dim, got {query_dim}, {key_dim}")
        self.score, self.query_dim, self.key_dim = score, query_dim, key_dim
        if score == "general":
            self.weight = nn.Parameter(torch.empty(query_dim, key_dim))
            nn.init.xavier_uniform_(self.weight)
        if score == "concat":
            attention_dim = key_dim if attention_dim is None else attention_dim
            if attention_dim < 1:  # (0 silently meant the default)
                raise ValueError(f"TemporalAttention: attention_dim must be positive, got {attention_dim}")
            self.query_proj = nn.Linear(query_dim, attention_dim, bias=False)
            self.key_proj = nn.Linear(key_dim, attention_dim)
            self.score_vector = nn.Parameter(torch.empty(attention_dim).uniform_(-attention_dim ** -0.5,
                                                                                 attention_dim ** -0.5))

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """Unnormalised scores ``[B, N, T]`` for query ``[B, N, Dq]``."""
        if self.score == "dot":
            return torch.matmul(query, keys.transpose(1, 2))
        if self.score == "general":
            return torch.matmul(torch.matmul(query, self.weight), keys.transpose(1, 2))
        hidden = torch.tanh(self.query_proj(query).unsqueeze(2) + self.key_proj(keys).unsqueeze(1))  # [B, N, T, A]
        return torch.matmul(hidden, self.score_vector)

    def forward(self, query: Tensor, keys: Tensor, values: Optional[Tensor] = None,
                return_weights: bool = False) -> Tensor | Tuple[Tensor, Tensor]:
        if isinstance(query, torch.fx.Proxy):  # torch.fx symbolic tracing: one leaf node (nn/_fx.py)
            return fx_leaf(self, query, keys, values, return_weights)
        single = query.dim() == 2
        if single:
            query = query.unsqueeze(1)
        if query.dim() != 3 or keys.dim() != 3 or query.shape[-1] != self.query_dim or keys.shape[-1] != self.key_dim:
            raise ValueError(f"TemporalAttention: expected query [B, ({self.query_dim})] or [B, N, {self.query_dim}] "
                             f"and keys [B, T, {self.key_dim}], got {tuple(query.shape)} and {tuple(keys.shape)}")
        if query.shape[0] != keys.shape[0] or keys.shape[1] == 0:  # (the softmax path broadcast a batch of 1, and
            # returned zero weights for no keys, where the kernel path raised)
            raise ValueError(f"TemporalAttention: query and keys must have the same batch size B and keys at least "
                             f"one step, got query {tuple(query.shape)} and keys {tuple(keys.shape)}")
        values = keys if values is None else values
        if values.dim() != 3 or values.shape[:2] != keys.shape[:2]:  # checked for every path, with or without weights
            raise ValueError(f"TemporalAttention: values must be [B, T, Dv] with B, T = {tuple(keys.shape[:2])} as keys, "
                             f"got {tuple(values.shape)}")
        if return_weights or self.score == "concat":
            weights = torch.softmax(self.scores(query, keys), dim=-1)
            context = torch.matmul(weights, values)
        else:
            q = query if self.score == "dot" else torch.matmul(query, self.weight)
            context = ops.nonlocal_attention(q, keys, values, scale=1.0)
            weights = None
        if single:
            context = context.squeeze(1)
            weights = weights.squeeze(1) if weights is not None else None
        return (context, weights) if return_weights else context
