"""The nonlocal block of Wang et al. 2018 ("Non-local Neural Networks", seed 003) on fastvid's
linear-memory attention.

``z = x + norm(out(y))`` with ``y_i = Σ_j f(θ_i, φ_j) g_j / C(x)``, where θ, φ, g are 1×1(×1)
convolutions (in → inter channels), φ and g optionally max-pooled ((1,2,2) for 3D inputs), and
``f`` by ``mode``:

* ``embedded_gaussian``: ``softmax_j(scale · θ_iᵀφ_j)`` — the tiled kernel (``ops.nonlocal_attention``);
* ``gaussian``: the same without the θ/φ embeddings (``x_iᵀ x_j``);
* ``dot_product``: ``θ_iᵀφ_j / M`` — computed as ``θ (φᵀ g) / M``, no N×M matrix;
* ``concatenation``: ``ReLU(w_fᵀ[θ_i, φ_j]) / M`` — query chunks with recomputation in backward
  (``ops.concatenation_attention``), not the softmax kernel.

``norm`` is a BatchNorm over ``in_channels`` with γ = β = 0 at initialisation (without a norm the
output conv starts at zero), so a freshly inserted block is the identity.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from .. import ops

MODES = ("embedded_gaussian", "dot_product", "gaussian", "concatenation")
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_DEFAULT_POOL = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}


class NonLocalBlock(nn.Module):
    """Nonlocal block for ``[B, C, L]`` (dims=1), ``[B, C, H, W]`` (dims=2) or ``[B, C, T, H, W]``
    (dims=3) inputs.

    Args:
        in_channels: C.
        inter_channels: channels of θ, φ, g (default C // 2, at least 1).
        mode: one of ``embedded_gaussian``, ``dot_product``, ``gaussian``, ``concatenation``.
        sub_sample: max-pool φ and g (kernel ``pool_size``, default (1,2,2) / (2,2) / 2).
        norm: BatchNorm (γ = 0 init) after the output conv.
        dims: 1, 2 or 3.
        scale: softmax temperature for the two softmax modes (default 1 as in Wang et al.;
            pytorchvideo's blocks use ``inter_channels ** -0.5``).
        pool_before_projection: pool x once before the φ and g convs (pytorchvideo's order) instead
            of pooling their outputs (Wang et al.'s and the standalone ports' order).
    """

    def __init__(self, in_channels: int, inter_channels: Optional[int] = None, mode: str = "embedded_gaussian",
                 sub_sample: bool = True, norm: bool = True, dims: int = 3, scale: Optional[float] = None,
                 pool_size: Optional[Union[int, Sequence[int]]] = None, pool_before_projection: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"NonLocalBlock: mode must be one of {MODES}, got {mode!r}")
        if dims not in _CONV:
            raise ValueError(f"NonLocalBlock: dims must be 1, 2 or 3, got {dims}")
        if in_channels <= 0:
            raise ValueError(f"NonLocalBlock: in_channels must be positive, got {in_channels}")
        inter = inter_channels if inter_channels is not None else max(1, in_channels // 2)
        conv = _CONV[dims]
        self.in_channels, self.inter_channels, self.mode, self.dims = in_channels, inter, mode, dims
        self.scale = 1.0 if scale is None else float(scale)
        self.pool_before_projection = pool_before_projection
        embedded = mode != "gaussian"
        self.theta = conv(in_channels, inter, 1) if embedded else None
        self.phi = conv(in_channels, inter, 1) if embedded else None
        self.g = conv(in_channels, inter, 1)
        self.out = conv(inter, in_channels, 1)
        self.concat_project = nn.Linear(2 * inter, 1, bias=False) if mode == "concatenation" else None
        self.pool = _POOL[dims](pool_size or _DEFAULT_POOL[dims]) if sub_sample else None
        self.norm = _NORM[dims](in_channels) if norm else None
        self.reset_identity()

    def reset_identity(self) -> None:
        """Zero the last affine map (norm γ, β, or the output conv without a norm): the block then
        returns its input unchanged, so it can be inserted into a trained network."""
        last = self.norm if self.norm is not None else self.out
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def _rows(self, t: Tensor) -> Tensor:
        """[B, C, *positions] -> [B, positions, C] (a view: the kernels read either stride order)."""
        return t.flatten(2).transpose(1, 2)

    def attend(self, x: Tensor) -> Tensor:
        """The attention output y ``[B, inter, *positions of x]`` (before the output conv)."""
        keys_in = self.pool(x) if (self.pool is not None and self.pool_before_projection) else x
        theta = self.theta(x) if self.theta is not None else x
        phi = self.phi(keys_in) if self.phi is not None else keys_in
        g = self.g(keys_in)
        if self.pool is not None and not self.pool_before_projection:
            phi, g = self.pool(phi), self.pool(g)
        q, k, v = self._rows(theta), self._rows(phi), self._rows(g)
        if self.mode in ("embedded_gaussian", "gaussian"):
            y = ops.nonlocal_attention(q, k, v, scale=self.scale)
        elif self.mode == "dot_product":
            y = ops.dot_product_attention(q, k, v)
        else:
            w = self.concat_project.weight.reshape(2, self.inter_channels)
            y = ops.concatenation_attention(q @ w[0], k @ w[1], v)
        return y.transpose(1, 2).reshape(x.shape[0], self.inter_channels, *x.shape[2:])

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"NonLocalBlock(dims={self.dims}): expected input [B, {self.in_channels}, "
                             f"{'positions' if self.dims == 1 else '...'}] of rank {self.dims + 2}, got "
                             f"{tuple(x.shape)}")
        z = self.out(self.attend(x))
        if self.norm is not None:
            z = self.norm(z)
        return x + z

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, inter_channels={self.inter_channels}, mode={self.mode!r}, dims={self.dims}, "
                f"scale={self.scale}, pool_before_projection={self.pool_before_projection}")
