"""Learnable pooling of frame features: NetVLAD and Context Gating, the aggregation head of the
YouTube-8M winners (seed 004; Miech, Laptev & Sivic, "Learnable pooling with Context Gating for video
classification", 2017; NetVLAD: Arandjelović et al., CVPR 2016).

Both work on frame features ``[B, T, D]`` from any per-frame model; NetVLAD ignores the order of
the frames (seed 004: "Pooling is not aware of temporal order")."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._fx import fx_leaf


class NetVLAD(nn.Module):
    """NetVLAD pooling of ``N`` descriptors of size ``D`` into one ``K·D`` vector.

    For cluster ``k`` with learnable centre ``c_k`` and assignment weights ``w_k, b_k`` (seed 004)::

        a_k(x_i)  = exp(w_kᵀ x_i + b_k) / Σ_k' exp(w_k'ᵀ x_i + b_k')      (soft assignment)
        V[k, j]   = Σ_i a_k(x_i) · (x_i[j] - c_k[j])                        (residual aggregation)
        V[k, :]  ← V[k, :] / ‖V[k, :]‖₂                                    (intra-normalisation)
        out       = flatten(V) / ‖flatten(V)‖₂                              (L2 normalisation)

    ``forward(x [B, N, D])`` → ``[B, K·D]``, cluster-major (``out[:, k·D + j]`` is ``V[k, j]``).
    ``normalize_input=True`` L2-normalises each descriptor first (as in the NetVLAD paper)."""

    def __init__(self, in_features: int, clusters: int = 64, normalize_input: bool = False, eps: float = 1e-12):
        super().__init__()
        if in_features < 1 or clusters < 1:  # (0 features divided by zero; 0 clusters gave an empty output)
            raise ValueError(f"NetVLAD: in_features and clusters must be positive, got {in_features}, {clusters}")
        self.in_features, self.clusters = in_features, clusters
        self.out_features = clusters * in_features
        self.normalize_input, self.eps = normalize_input, eps
        self.assignment = nn.Linear(in_features, clusters)  # w_k, b_k
        self.centers = nn.Parameter(torch.empty(clusters, in_features))  # c_k
        nn.init.uniform_(self.centers, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: one leaf node (nn/_fx.py)
            return fx_leaf(self, x)
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"NetVLAD: expected descriptors [B, N, {self.in_features}], got {tuple(x.shape)}")
        if x.shape[1] == 0:  # (gave a zero vector where the output is L2-normalised)
            raise ValueError(f"NetVLAD: needs at least one descriptor per sample (N >= 1), got {tuple(x.shape)}")
        if self.normalize_input:
            x = F.normalize(x, dim=-1, eps=self.eps)
        soft_assign = torch.softmax(self.assignment(x), dim=-1)  # [B, N, K]
        # Σ_i a_k(x_i) (x_i - c_k) = Σ_i a_k(x_i) x_i - c_k Σ_i a_k(x_i)
        vlad = soft_assign.transpose(1, 2) @ x - soft_assign.sum(dim=1).unsqueeze(-1) * self.centers  # [B, K, D]
        vlad = F.normalize(vlad, dim=-1, eps=self.eps)
        return F.normalize(vlad.flatten(1), dim=-1, eps=self.eps)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, clusters={self.clusters}, normalize_input={self.normalize_input}"


class ContextGating(nn.Module):
    """Context Gating (seed 004): ``Y = σ(W X + b) ∘ X``, a learned gate in ``(0, 1)`` per feature
    that depends on all features. ``forward(x [..., features])`` → same shape."""

    def __init__(self, features: int):
        super().__init__()
        self.gate = nn.Linear(features, features)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: one leaf node (nn/_fx.py)
            return fx_leaf(self, x)
        if x.dim() == 0 or x.shape[-1] != self.gate.in_features:
            raise ValueError(f"ContextGating: expected [..., {self.gate.in_features}] features, got {tuple(x.shape)}")
        return torch.sigmoid(self.gate(x)) * x


__all__ = ["NetVLAD", "ContextGating"]
