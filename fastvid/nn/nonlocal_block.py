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

import contextlib
import copy
import functools
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _backend, ops
from .._sizes import ntuple
from ..ops._common import autocast_enabled
from ._build import module_to_fill
from ._fx import fx_leaf

MODES = ("embedded_gaussian", "dot_product", "gaussian", "concatenation")


def _pooling_layout(t: Tensor) -> Tensor:
    """``t`` in the layout PyTorch's CPU max-pooling is fastest on: channels-last for 2-D and 3-D windows
    (the same values and argmax positions, NaNs and ties included; two threads, session 37: [2, 256, 8,
    28, 28] with (1, 2, 2) windows 8.5 -> 3.2 ms copy included, [4, 256, 56, 56] with 2×2 7.7 -> 2.5)."""
    if t.device.type != "cpu" or t.dim() not in (4, 5) or _backend.in_func_transform():  # (vmap: no such layouts)
        return t
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def _autocast_off(device_type: str):
    """Autocast off for the block's fp32 statistics; devices without autocast (meta) have nothing to turn off."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _SecondOrderRefused(torch.autograd.Function):
    """The results of a first-order-only backward, passed on unchanged, with a node whose own backward raises,
    connected to the tensors those results depend on (the step's saved tensors and incoming gradients)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(count: int, *tensors: Tensor):
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_SECOND_ORDER_REFUSED)

    @staticmethod
    def jvp(ctx, *tangents):  # forward over reverse (torch.func.hessian, jvp of grad): a second derivative too
        raise RuntimeError(_SECOND_ORDER_REFUSED)


_SECOND_ORDER_REFUSED = ("NonLocalBlock: second derivatives (create_graph=True, then a gradient of a gradient, or "
                         "forward mode over a gradient) are not supported by its fused steps; "
                         "fastvid.convert(model, to='reference') gives the plain-PyTorch twin, which has them")


def _first_order_only(backward):
    """A Function's backward run without recording; under create_graph its results pass through
    _SecondOrderRefused, so that a second derivative through the step raises. (PyTorch's once_differentiable
    hangs its error on detached copies, outside the graph: torch.autograd.grad(..., inputs=...) skipped it and
    returned the model's second derivative without the block's terms, silently.)"""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            results = backward(ctx, *grads)
        if not create_graph:
            return results
        single = not isinstance(results, tuple)
        as_tuple = (results,) if single else results
        anchors = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, Tensor) and t.requires_grad]
        present = [r for r in as_tuple if r is not None]
        if not anchors or not present:
            return results
        refused = iter(_SecondOrderRefused.apply(len(present), *present, *anchors))
        passed = tuple(None if r is None else next(refused) for r in as_tuple)
        return passed[0] if single else passed
    return wrapper


def _apply(function, *args):
    """``function.apply(*args)`` with the forward-mode rule of its ``ForwardMode`` subclass, except under
    torch.compile: dynamo cannot trace a Function that defines jvp ("Unsupported custom jvp"), and forward mode
    does not run there."""
    if not torch.compiler.is_compiling():
        function = _FORWARD_MODE[function]
    return function.apply(*args)


class _WindowMaxPool(torch.autograd.Function):
    """Max-pool with stride = kernel (non-overlapping windows) whose backward keeps only the argmax
    positions, as int32. nn.MaxPoolNd's autograd also keeps its whole input alive — here φ and g at
    full resolution, the largest tensor of the block's backward; the gradient needs only the
    positions (each input position is the argmax of at most one window, so a scatter is exact)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, kernel):
        """(pooled, argmax positions: int32 where they fit)."""
        pool = {3: F.max_pool1d, 4: F.max_pool2d, 5: F.max_pool3d}[x.dim()]
        out, positions = pool(_pooling_layout(x), kernel, kernel, return_indices=True)
        if x.dim() == 3:  # max_pool1d's result is a view (of a 2-D pool's): forward mode needs its own storage
            out = out.clone()
        small = math.prod(x.shape[2:]) < 2 ** 31
        return out, positions.to(torch.int32) if small else positions

    @staticmethod
    def setup_context(ctx, inputs, output):
        positions = output[1]
        ctx.mark_non_differentiable(positions)
        ctx.save_for_backward(positions)
        ctx.input_shape = inputs[0].shape

    @staticmethod
    @_first_order_only
    def backward(ctx, grad: Tensor, _grad_positions=None):
        (positions,) = ctx.saved_tensors
        shape = ctx.input_shape
        grad_input = grad.new_zeros(shape[0], shape[1], math.prod(shape[2:]))
        grad_input.scatter_(2, positions.flatten(2).long(), grad.reshape(positions.flatten(2).shape))
        return grad_input.view(shape), None


class _WindowMaxPoolForwardMode(_WindowMaxPool):
    """_WindowMaxPool with its forward-mode (jvp) rule (see _apply)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _WindowMaxPool.setup_context(ctx, inputs, output)
        ctx.save_for_forward(output[1])

    @staticmethod
    def jvp(ctx, tangent: Tensor, _kernel):
        """Forward mode: the tangent at each window's argmax."""
        (positions,) = ctx.saved_tensors
        return tangent.flatten(2).gather(2, positions.flatten(2).long()).view(positions.shape), None


class _PointwiseConv(torch.autograd.Function):
    """``W t + b`` ``[B, O, L]`` for t ``[B, C, L]``, W ``[O, C]``, b ``[O]`` or None: the 1×1(×1)
    projections, as batched GEMMs (the BLAS reads either stride order in place). The result is the
    transpose of ``[B, L, O]`` storage: the attention op then reads q, k and v as dense rows (q read
    transposed made the op ~5 % slower) and the φ/g max-pool gets its channels-last input without a copy.
    oneDNN's 1-D convolution, used before, took about as long forward, but its backward first copied a
    transposed gradient (θ's: the attention op's dq is ``[B, N, inter]``) and ran at ~30 % of the FMA peak:
    AVX-512, two threads, B=2 C=256 L=6272, conv fwd+bwd 27.9 / 37.3 ms (O = 128 transposed / 256)
    against forward 3.6 / 16.0 plus 6.4 / 12.9 ms for the backward GEMMs (session 37)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t: Tensor, weight: Tensor, bias: Optional[Tensor]):
        weight_t = weight.t().expand(t.shape[0], -1, -1)
        rows = t.transpose(1, 2)
        out = torch.bmm(rows, weight_t) if bias is None else torch.baddbmm(bias, rows, weight_t)
        return out.transpose(1, 2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        t, weight, bias = inputs
        ctx.save_for_backward(t, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    @_first_order_only
    def backward(ctx, grad: Tensor):
        t, weight = ctx.saved_tensors
        needs_t, needs_weight, needs_bias = ctx.needs_input_grad
        # Under autocast the forward's product ran in the autocast dtype, which is grad's: the backward's
        # products run in it too, and each gradient returns in its input's dtype (the batch and bias sums
        # accumulated in it), as autocast's own casts would return it.
        grad_t = grad_weight = grad_bias = None
        if needs_t:
            grad_t = torch.bmm(weight.to(grad.dtype).t().expand(grad.shape[0], -1, -1), grad).to(t.dtype)
        if needs_weight:
            grad_weight = torch.bmm(grad, t.to(grad.dtype).transpose(1, 2)).sum(0, dtype=weight.dtype)
        if needs_bias and ctx.bias_dtype is not None:
            grad_bias = grad.sum((0, 2), dtype=ctx.bias_dtype)
        return grad_t, grad_weight, grad_bias


class _PointwiseConvForwardMode(_PointwiseConv):
    """_PointwiseConv with its forward-mode (jvp) rule (see _apply)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _PointwiseConv.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], inputs[1])

    @staticmethod
    def jvp(ctx, t_tangent, weight_tangent, bias_tangent):
        """Forward mode (the product rule): W dt + dW t + db."""
        t, weight = ctx.saved_tensors
        terms = []
        if t_tangent is not None:
            terms.append(_PointwiseConv.forward(t_tangent, weight, None))
        if weight_tangent is not None or bias_tangent is not None:
            dw = weight_tangent if weight_tangent is not None else torch.zeros_like(weight)
            terms.append(_PointwiseConv.forward(t, dw, bias_tangent))
        return sum(terms[1:], terms[0])


class _CentredMoments(torch.autograd.Function):
    """Centred statistics of ``rows`` ``[n, D]`` (corrected two-pass): ``(pivot, delta, cov)`` with the
    mean ``pivot + delta`` and covariance ``cov`` (divided by n). ``pivot`` is the mean rounded to the
    rows' dtype (a constant: no gradient), ``delta`` and ``cov`` are fp32 (fp64 for fp64) from the rows
    minus the pivot. The one-pass E[yyᵀ] − μμᵀ cancels when a channel's mean is large relative to its
    spread (normal for attention outputs; at mean/std = 1000 in fp32 it zeroes variances), and a mean
    rounded to fp32 is off by eps·|mean|; ``delta`` keeps that part. Saves only ``rows`` (which the
    block keeps anyway); backward recomputes the centred rows."""

    generate_vmap_rule = True

    @staticmethod
    def forward(rows: Tensor):
        acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
        with _autocast_off(rows.device.type):
            pivot = rows.to(acc).mean(0).to(rows.dtype)
            centred = rows.to(acc) - pivot.to(acc)
            delta = centred.mean(0)
            centred -= delta
            cov = centred.T @ centred / rows.shape[0]
        return pivot, delta, cov

    @staticmethod
    def setup_context(ctx, inputs, output):
        pivot, delta, _ = output
        ctx.mark_non_differentiable(pivot)
        ctx.save_for_backward(inputs[0], pivot, delta)

    @staticmethod
    def centred(rows: Tensor, pivot: Tensor, delta: Tensor) -> Tensor:
        """The centred rows C in delta's dtype, recomputed from what the forward saved (autocast off)."""
        return rows.to(delta.dtype) - pivot.to(delta.dtype) - delta

    @staticmethod
    @_first_order_only
    def backward(ctx, _grad_pivot, grad_delta: Tensor, grad_cov: Tensor):
        # d cov = (Cᵀ dC + dCᵀ C)/n with C the centred rows; the mean's path vanishes as C's columns sum to 0.
        rows, pivot, delta = ctx.saved_tensors
        n = rows.shape[0]
        with _autocast_off(rows.device.type):
            grad = _CentredMoments.centred(rows, pivot, delta) @ ((grad_cov + grad_cov.T) / n) + grad_delta / n
        return grad.to(rows.dtype)


class _CentredMomentsForwardMode(_CentredMoments):
    """_CentredMoments with its forward-mode (jvp) rule (see _apply)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _CentredMoments.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], output[0], output[1])

    @staticmethod
    def jvp(ctx, rows_tangent: Tensor):
        """Forward mode: d delta = mean(d rows) (the pivot is a constant), d cov = (Cᵀ dC + dCᵀ C)/n with C the
        centred rows and dC = d rows - d delta."""
        rows, pivot, delta = ctx.saved_tensors
        n = rows.shape[0]
        with _autocast_off(rows.device.type):
            d_rows = rows_tangent.to(delta.dtype)
            d_delta = d_rows.mean(0)
            product = _CentredMoments.centred(rows, pivot, delta).T @ (d_rows - d_delta) / n
        return None, d_delta, product + product.T


def _positions_major(x: Tensor) -> bool:
    """Whether ``x`` ``[B, C, N]`` is stored positions-major: the flattened view of a channels_last(_3d) input."""
    return x.shape[1] > 1 and x.stride(1) == 1 and x.stride(2) == x.shape[1]


def _projected(y: Tensor, weight: Tensor, x: Tensor, add_x: bool = False) -> Tensor:
    """``weight yᵀ`` (+ ``x`` with add_x) ``[B, C, N]`` for y ``[B, N, D]``, weight ``[C, D]`` and x ``[B, C, N]``,
    stored as x is: positions-major for a channels_last input (the product formed as ``y weightᵀ`` rows, so the
    block's output keeps the input's layout, as x + conv(y) would), else channels-major."""
    B = y.shape[0]
    if _positions_major(x):
        weight_t = weight.t().expand(B, -1, -1)
        rows = torch.baddbmm(x.transpose(1, 2), y, weight_t) if add_x else torch.bmm(y, weight_t)
        return rows.transpose(1, 2)
    weight = weight.expand(B, -1, -1)
    return torch.baddbmm(x, weight, y.transpose(1, 2)) if add_x else torch.bmm(weight, y.transpose(1, 2))


class _CentredAffine(torch.autograd.Function):
    """``x + A (y − pivot)ᵀ + shift`` for x ``[B, C, N]``, A ``[C, D]`` and shift ``[C]`` (fp32/fp64),
    y ``[B, N, D]``, pivot ``[D]`` (a constant in y's dtype near y's mean): the folded BatchNorm. A's
    gradient Σ g (y − pivot)ᵀ is formed from centred y (as Σ g yᵀ − (Σ g) pivotᵀ it would cancel when
    y's mean dwarfs its spread). Saves y (which the attention op keeps anyway) and recomputes the
    centred copy in backward. Under autocast (x wider than y) x is added after the product, so the
    residual is not rounded to y's dtype. The result is stored as x is (_projected)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, folded: Tensor, y: Tensor, pivot: Tensor, shift: Tensor):
        with _autocast_off(y.device.type):
            centred, weight = y - pivot, folded.to(y.dtype)
            if x.dtype == y.dtype:
                out = _projected(centred, weight, x, add_x=True)
                # in place saves a pass, but not under torch.compile: torch 2.11's dynamo gives zero
                # gradients to a Function whose returned tensor is an in-place op's result (2.14 does not)
                shift_column = shift.to(y.dtype)[None, :, None]
                out = out + shift_column if torch.compiler.is_compiling() else out.add_(shift_column)
            else:
                out = x + _projected(centred, weight, x).add_(shift.to(y.dtype)[None, :, None])
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, folded, y, pivot, _ = inputs
        ctx.save_for_backward(folded, y, pivot)
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape

    @staticmethod
    @_first_order_only
    def backward(ctx, grad: Tensor):
        folded, y, pivot = ctx.saved_tensors
        acc = folded.dtype
        with _autocast_off(grad.device.type):
            grad_acc = grad.to(acc)
            grad_folded = (grad_acc @ (y.to(acc) - pivot.to(acc))).sum(0)
            # bmm reads the transposed grad in place (matmul against a 2-D folded would copy it first)
            grad_y = torch.bmm(grad.to(y.dtype).transpose(1, 2), folded.to(y.dtype).expand(grad.shape[0], -1, -1))
        return grad.to(ctx.x_dtype), grad_folded, grad_y, None, grad_acc.sum((0, 2))


class _CentredAffineForwardMode(_CentredAffine):
    """_CentredAffine with its forward-mode (jvp) rule (see _apply)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _CentredAffine.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[1], inputs[2], inputs[3])

    @staticmethod
    def jvp(ctx, x_tangent, folded_tangent, y_tangent, _pivot_tangent, shift_tangent):
        """Forward mode (the pivot is a constant): dx + dA (y − pivot)ᵀ + A dyᵀ + d shift, [B, C, N]."""
        folded, y, pivot = ctx.saved_tensors
        acc = folded.dtype
        terms = []  # out of place: under vmap (jacfwd) a tangent may be batched where the primals are not
        with _autocast_off(y.device.type):
            if folded_tangent is not None:
                terms.append(((y.to(acc) - pivot.to(acc)) @ folded_tangent.to(acc).T).transpose(1, 2))
            if y_tangent is not None:
                terms.append((y_tangent.to(acc) @ folded.T).transpose(1, 2))
            if shift_tangent is not None:
                terms.append(shift_tangent.to(acc)[None, :, None])
            if x_tangent is not None:
                terms.append(x_tangent.to(acc))
            out = sum(terms[1:], terms[0])
        return out.to(ctx.x_dtype).expand(ctx.x_shape)  # (a tangent of the shift alone is [1, C, 1])


_FORWARD_MODE = {_WindowMaxPool: _WindowMaxPoolForwardMode, _PointwiseConv: _PointwiseConvForwardMode,
                 _CentredMoments: _CentredMomentsForwardMode, _CentredAffine: _CentredAffineForwardMode}


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_DEFAULT_POOL = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}


def _check_save_scores(mode: str, save_scores: bool) -> None:
    if save_scores and mode not in ("embedded_gaussian", "gaussian"):
        raise ValueError(f"NonLocalBlock: save_scores applies to the softmax modes (embedded_gaussian, gaussian); "
                         f"mode {mode!r} has no scores to save")


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
        save_scores: the two softmax modes on the CPU keep the N×M scores for the backward instead of
            recomputing them (``ops.nonlocal_attention``'s ``save_scores``: faster training, memory
            quadratic in the positions; the same results).
    """

    save_scores = False  # (the default of blocks pickled before the argument existed)

    def __init__(self, in_channels: int, inter_channels: Optional[int] = None, mode: str = "embedded_gaussian",
                 sub_sample: bool = True, norm: bool = True, dims: int = 3, scale: Optional[float] = None,
                 pool_size: Optional[Union[int, Sequence[int]]] = None, pool_before_projection: bool = False,
                 save_scores: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"NonLocalBlock: mode must be one of {MODES}, got {mode!r}")
        if not isinstance(save_scores, bool):
            raise TypeError(f"NonLocalBlock: save_scores must be a bool, got {type(save_scores).__name__}")
        _check_save_scores(mode, save_scores)
        if dims not in _CONV:
            raise ValueError(f"NonLocalBlock: dims must be 1, 2 or 3, got {dims}")
        if in_channels <= 0:
            raise ValueError(f"NonLocalBlock: in_channels must be positive, got {in_channels}")
        inter = inter_channels if inter_channels is not None else max(1, in_channels // 2)
        if inter <= 0:  # (it failed at the first call, inside the pooling)
            raise ValueError(f"NonLocalBlock: inter_channels must be positive, got {inter_channels}")
        if pool_size is not None and sub_sample:  # (0 or () read as the default window; a wrong length failed in forward)
            window = ntuple(pool_size, dims)
            if len(window) != dims or any(not isinstance(k, int) or k < 1 for k in window):
                raise ValueError(f"NonLocalBlock: pool_size must be one int or {dims} ints, each >= 1, got {pool_size!r}")
        conv = _CONV[dims]
        self.in_channels, self.inter_channels, self.mode, self.dims = in_channels, inter, mode, dims
        self.scale = 1.0 if scale is None else float(scale)
        self.pool_before_projection = pool_before_projection
        self.save_scores = save_scores
        embedded = mode != "gaussian"
        self.theta = conv(in_channels, inter, 1) if embedded else None
        self.phi = conv(in_channels, inter, 1) if embedded else None
        self.g = conv(in_channels, inter, 1)
        self.out = conv(inter, in_channels, 1)
        self.concat_project = nn.Linear(2 * inter, 1, bias=False) if mode == "concatenation" else None
        self.pool = _POOL[dims](_DEFAULT_POOL[dims] if pool_size is None else pool_size) if sub_sample else None
        self.norm = _NORM[dims](in_channels) if norm else None
        self.reset_identity()

    def reset_identity(self) -> None:
        """Zero the last affine map (norm γ, β, or the output conv without a norm): the block then
        returns its input unchanged, so it can be inserted into a trained network."""
        last = self.norm if self.norm is not None else self.out
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    @staticmethod
    def _pointwise(convs, t: Tensor) -> Tensor:
        """The 1×1(×1) convolutions ``convs`` (same input) applied to ``t`` ``[B, C, *positions]`` as one
        product over the flattened positions with the stacked weights: ``[B, Σ out_channels, L]``, stored
        positions-major (_PointwiseConv). One product for φ and g."""
        weight = torch.cat([c.weight.flatten(1) for c in convs]) if len(convs) > 1 else convs[0].weight.flatten(1)
        if all(c.bias is None for c in convs):
            bias = None
        else:
            bias = torch.cat([c.bias if c.bias is not None else c.weight.new_zeros(c.out_channels) for c in convs])
        flat = t.flatten(2)
        return _apply(_PointwiseConv, flat, weight.to(flat.dtype), None if bias is None else bias.to(flat.dtype))

    def _pool(self, t: Tensor) -> Tensor:
        kernel = self.pool.kernel_size
        if _is_plain_max_pool(self.pool) and torch.is_grad_enabled() and t.requires_grad:
            return _apply(_WindowMaxPool, t, kernel)[0]
        return self.pool(_pooling_layout(t)).to(t.dtype)  # CPU autocast pools in fp32; the maximum is exact

    def attend(self, x: Tensor) -> Tensor:
        """The attention output y ``[B, N, inter]`` (N = positions of x; before the output conv)."""
        B, inter = x.shape[0], self.inter_channels
        pool = self._pool if self.pool is not None else None
        if self.mode == "gaussian":
            keys_in = pool(x) if pool is not None else x
            theta, phi = x.flatten(2), keys_in.flatten(2)
            if pool is not None and not self.pool_before_projection:
                g = pool(self._pointwise([self.g], x).view(B, inter, *x.shape[2:])).flatten(2)
            else:
                g = self._pointwise([self.g], keys_in)
        elif pool is not None and self.pool_before_projection:
            pooled = pool(x)
            theta = self._pointwise([self.theta], x)
            phi, g = self._pointwise([self.phi, self.g], pooled).split(inter, dim=1)
        else:
            # θ on its own, φ and g stacked: their gradients then need no concatenation but the
            # (pooled, smaller) φ/g one.
            theta = self._pointwise([self.theta], x)
            phi_g = self._pointwise([self.phi, self.g], x)
            if pool is not None:
                phi_g = pool(phi_g.view(B, 2 * inter, *x.shape[2:])).flatten(2)
            phi, g = phi_g.split(inter, dim=1)
        # [B, channels, positions] -> [B, positions, channels] views: the kernels read either stride order
        q, k, v = theta.transpose(1, 2), phi.transpose(1, 2), g.transpose(1, 2)
        # Under autocast g is in the autocast dtype, the gaussian mode's θ and φ are x itself.
        q, k = q.to(v.dtype), k.to(v.dtype)
        if self.mode in ("embedded_gaussian", "gaussian"):
            return ops.nonlocal_attention(q, k, v, scale=self.scale, save_scores=self.save_scores)
        _check_save_scores(self.mode, self.save_scores)  # (set after construction)
        if self.mode == "dot_product":
            return ops.dot_product_attention(q, k, v)
        w = self.concat_project.weight.reshape(2, inter).to(q.dtype)
        return ops.concatenation_attention(q @ w[0], k @ w[1], v)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: one leaf node (nn/_fx.py)
            return fx_leaf(self, x)
        if torch.jit.is_tracing():  # TorchScript cannot hold the Python autograd functions of its fused steps
            raise RuntimeError("NonLocalBlock: torch.jit.trace cannot record it (its fused steps are Python autograd "
                               "functions); trace fastvid.convert(model, to='reference'), or use torch.export")
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"NonLocalBlock(dims={self.dims}): expected input [B, {self.in_channels}, "
                             f"{'positions' if self.dims == 1 else '...'}] of rank {self.dims + 2}, got "
                             f"{tuple(x.shape)}")
        if _is_plain_max_pool(self.pool):  # (padding or ceil_mode would let a smaller input through)
            window = _as_tuple(self.pool.kernel_size, self.dims)
            if any(size < k for size, k in zip(x.shape[2:], window)):
                raise ValueError(f"NonLocalBlock: sub_sample max-pools the keys with window {window}, larger than "
                                 f"the input's {tuple(x.shape[2:])} in some dimension (give a smaller pool_size, "
                                 f"or sub_sample=False)")
        parameter_dtype = self.g.weight.dtype
        if not x.is_floating_point():  # (under autocast too: the projections would take integer weights)
            raise RuntimeError(f"NonLocalBlock: input x must be a floating-point tensor, got {x.dtype}")
        if x.dtype != parameter_dtype and not autocast_enabled(x.device.type):
            raise RuntimeError(f"NonLocalBlock: input x has dtype {x.dtype} but the parameters have dtype "
                               f"{parameter_dtype} (convert one of them, or run under torch.autocast)")
        y = self.attend(x)  # [B, N, inter], rows contiguous
        weight = self.out.weight.flatten(1)  # [C, inter]
        bias = self.out.bias if self.out.bias is not None else weight.new_zeros(self.in_channels)
        # Folded only where the norm is exactly PyTorch's BatchNorm: a subclass (SyncBatchNorm, whose statistics
        # span the processes; any overridden forward) runs its own forward on z below.
        if type(self.norm) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            return self._folded_batch_norm(x, y, weight, bias)
        weight, bias = weight.to(y.dtype), bias.to(y.dtype)
        # z = W y + b formed where another norm takes it, or under autocast (x wider than y: x is added at its
        # own precision, as x + conv(y) would be)
        if self.norm is not None or x.dtype != y.dtype:
            z = _projected(y, weight, x.flatten(2)).add_(bias[None, :, None]).view(x.shape)
            return x + (z if self.norm is None else self.norm(z))
        # x + W y + b as one batched GEMM (y read in place, which the attention op keeps for its backward
        # anyway); the bias is added in place.
        out = _projected(y, weight, x.flatten(2), add_x=True)
        return out.add_(bias[None, :, None]).view(x.shape)

    def _folded_batch_norm(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """``x + BatchNorm(z)`` for z = W y + b without forming z. For any pivot p, BatchNorm(z) =
        A (y − p) + γ (W p + b − μ)/σ + β with A = diag(γ/σ) W. With batch statistics, z's mean and
        variance follow from y's (μ = W μ_y + b, σ² = diag(W Σ_y Wᵀ)), and with μ_y = p + δ the shift is
        β − γ W δ / σ. z is never formed, which saves the two C×N tensors a separate BatchNorm keeps
        (its input) and makes (its output). Running statistics are updated as nn.BatchNorm does
        (momentum, or a cumulative average when it is None; unbiased variance). Statistics and fold
        run in fp32 (fp64 for fp64) with autocast off, around a pivot at y's mean: raw moments of y,
        or a bf16 Σ_y, lose channels whose mean is large relative to their spread."""
        norm = self.norm
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        rows = y.reshape(-1, y.shape[-1])
        n = rows.shape[0]  # values per channel of z
        if norm.training and n == 1:  # nn.BatchNorm's check (one value has no variance)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        with _autocast_off(y.device.type):
            weight, bias = weight.to(acc), bias.to(acc)
            gamma = norm.weight.to(acc) if norm.affine else None
            beta = norm.bias.to(acc) if norm.affine else weight.new_zeros(())
            if norm.training or not norm.track_running_stats or n == 0:
                if n == 0:  # an empty batch (output empty, gradients zero): no statistics to take
                    D = y.shape[-1]
                    pivot, delta, cov_y = y.new_zeros(D), weight.new_zeros(D), weight.new_zeros(D, D)
                else:
                    pivot, delta, cov_y = _apply(_CentredMoments, rows)
                var = ((weight @ cov_y) * weight).sum(1).clamp_min(0)
                scale = torch.rsqrt(var + norm.eps) if gamma is None else torch.rsqrt(var + norm.eps) * gamma
                # b cancels against μ; it stays in the graph with nn.BatchNorm's zero gradient (DDP expects one)
                shift = beta - scale * (weight @ delta) + 0 * bias
                if norm.training and norm.track_running_stats:
                    with torch.no_grad():
                        norm.num_batches_tracked += 1  # nn.BatchNorm counts an empty batch, stats untouched
                        if n > 0:
                            factor = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
                            mean = weight @ (pivot.to(acc) + delta) + bias
                            norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
                            unbiased = var * (n / (n - 1))
                            norm.running_var.lerp_(unbiased.to(norm.running_var.dtype), factor)
            else:
                # Running statistics: pivot 0, so that each sample's output is its own (a batch mean as pivot
                # carried one sample's NaN, or its large values' rounding, into the others' outputs); the
                # cancellation of A y against the shift is nn.BatchNorm's of W y + b against μ.
                pivot = y.new_zeros(y.shape[-1])
                scale = torch.rsqrt(norm.running_var.to(acc) + norm.eps)
                scale = scale if gamma is None else scale * gamma
                shift = beta + scale * (bias - norm.running_mean.to(acc))
        return _apply(_CentredAffine, x.flatten(2), weight * scale[:, None], y, pivot, shift).view(x.shape)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, inter_channels={self.inter_channels}, mode={self.mode!r}, dims={self.dims}, "
                f"scale={self.scale}, pool_before_projection={self.pool_before_projection}"
                + (", save_scores=True" if self.save_scores else ""))


# ------------------------------------------------------------------------------ drop-in conversion
# Nonlocal blocks written by hand come in two common shapes; both are recognised by their attributes
# (no import of the library they come from), turned into candidate NonLocalBlocks sharing their
# submodules, and a candidate is accepted only if it reproduces the original on a probe input.
#
# * pytorchvideo-style: conv_theta, conv_phi, conv_g, conv_out, pool (applied to x before φ and g),
#   norm, instantiation "softmax" (scores scaled by inter^-0.5) or "dot_product";
# * standalone ports (Wang et al.'s structure as most PyTorch re-implementations write it): theta,
#   phi, g (a conv, or Sequential(conv, max-pool)), W (a conv, or Sequential(conv, BatchNorm)),
#   optionally concat_project (Sequential(Conv2d(2·inter, 1, 1), ReLU)) for concatenation;
#   embedded Gaussian and dot product share that structure, the probe tells them apart.

def _is_pointwise_conv(m) -> bool:
    return (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and all(k == 1 for k in m.kernel_size)
            and all(s == 1 for s in m.stride) and all(p == 0 for p in m.padding) and m.groups == 1)


def _as_tuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _is_plain_max_pool(m) -> bool:
    """A max pool whose stride equals its kernel, without padding/dilation (what both styles use)."""
    if not isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return False
    stride = m.stride if m.stride is not None else m.kernel_size
    return (_as_tuple(stride, 1) == _as_tuple(m.kernel_size, 1) and set(_as_tuple(m.padding, 1)) == {0}
            and set(_as_tuple(m.dilation, 1)) == {1} and not m.ceil_mode and not m.return_indices)


def _conv_then_pool(m):
    """(conv, pool) for a pointwise conv or Sequential(conv, max-pool); None when neither."""
    if _is_pointwise_conv(m):
        return m, None
    if isinstance(m, nn.Sequential) and len(m) == 2 and _is_pointwise_conv(m[0]) and _is_plain_max_pool(m[1]):
        return m[0], m[1]
    return None


def _dims_of(conv) -> int:
    # isinstance: a parametrized conv (weight_norm) is a subclass; the block reads its weight each call
    return next(dims for cls, dims in ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3)) if isinstance(conv, cls))


def _candidates_pytorchvideo(module):
    convs = [getattr(module, name, None) for name in ("conv_theta", "conv_phi", "conv_g", "conv_out")]
    instantiation = getattr(module, "instantiation", None)
    pool, norm = getattr(module, "pool", None), getattr(module, "norm", None)
    if not all(_is_pointwise_conv(c) for c in convs) or instantiation not in ("softmax", "dot_product"):
        return []
    if pool is not None and not _is_plain_max_pool(pool):
        return []
    theta, phi, g, out = convs
    dims, inter = _dims_of(theta), theta.out_channels
    block = module_to_fill(NonLocalBlock, NonLocalBlock, theta.in_channels, inter,
                           "embedded_gaussian" if instantiation == "softmax" else "dot_product",
                           sub_sample=pool is not None, norm=norm is not None, dims=dims, scale=inter ** -0.5,
                           pool_before_projection=True)
    block.theta, block.phi, block.g, block.out, block.pool, block.norm = theta, phi, g, out, pool, norm
    return [block]


def _candidates_standalone(module):
    g_pool = _conv_then_pool(getattr(module, "g", None))
    W = getattr(module, "W", None)
    if g_pool is None or W is None:
        return []
    g, pool = g_pool
    if _is_pointwise_conv(W):
        out, norm = W, None
    elif isinstance(W, nn.Sequential) and len(W) == 2 and _is_pointwise_conv(W[0]) and \
            isinstance(W[1], (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        out, norm = W[0], W[1]
    else:
        return []
    dims, inter, in_channels = _dims_of(g), g.out_channels, g.in_channels
    theta, phi = getattr(module, "theta", None), getattr(module, "phi", None)
    concat = getattr(module, "concat_project", None)

    def make(mode, theta_conv, phi_conv):
        block = module_to_fill(NonLocalBlock, NonLocalBlock, in_channels, inter, mode, sub_sample=pool is not None,
                               norm=norm is not None, dims=dims,
                               pool_size=pool.kernel_size if pool is not None else None)
        block.theta, block.phi, block.g, block.out, block.norm = theta_conv, phi_conv, g, out, norm
        if pool is not None:
            block.pool = pool
        return block

    if _is_pointwise_conv(theta):
        phi_pool = _conv_then_pool(phi)
        if phi_pool is None or (phi_pool[1] is None) != (pool is None):
            return []
        if concat is not None:
            if not (isinstance(concat, nn.Sequential) and len(concat) == 2 and isinstance(concat[0], nn.Conv2d)
                    and concat[0].weight.shape == (1, 2 * inter, 1, 1) and concat[0].bias is None
                    and isinstance(concat[1], nn.ReLU)):
                return []
            block = make("concatenation", theta, phi_pool[0])
            block.concat_project = concat[0]  # shared, as the other projections (its [1, 2·inter, 1, 1] weight reads alike)
            return [block]
        return [make("embedded_gaussian", theta, phi_pool[0]), make("dot_product", theta, phi_pool[0])]
    if theta is None and g.in_channels == in_channels:  # gaussian: f = softmax(x_iᵀ x_j)
        return [make("gaussian", None, None)]
    return []


#: The probe's precisions, most telling first, and its acceptance in each: the largest difference between the
#: original's and a candidate's output relative to the original's largest value. In float64 a correct candidate
#: differs by rounding only (<= 4e-14 on pytorchvideo's blocks, amplified by a BatchNorm on batch statistics), a
#: different function (a scaled softmax, another mode, a missing step) by far more. float32 serves a block whose
#: own code does not run in float64 (float32 tensors made inside its forward).
PROBE_PRECISIONS = ((torch.float64, 1e-10), (torch.float32, 1e-4))


def _probe_matches(original: nn.Module, candidate: NonLocalBlock) -> bool:
    """Whether ``candidate`` computes ``original``'s function on a random probe input, in eval mode and
    in training mode (BatchNorm on batch statistics; a dropout inside the original makes it differ), in the
    first of PROBE_PRECISIONS that the original runs in. An exception from the candidate, or from the
    original in float32, propagates: the caller reports it rather than taking it for a mismatch."""
    *first, (last_dtype, last_tolerance) = PROBE_PRECISIONS
    for dtype, tolerance in first:
        verdict = _probe_in(original, candidate, dtype, tolerance, may_decline=True)
        if verdict is not None:
            return verdict
    return _probe_in(original, candidate, last_dtype, last_tolerance, may_decline=False)


def _probe_in(original: nn.Module, candidate: NonLocalBlock, dtype: torch.dtype, tolerance: float,
              may_decline: bool) -> Optional[bool]:
    """_probe_matches in one precision; None (may_decline) where the original's forward raises or returns
    another dtype there. Both are copied together (so the submodules they share stay shared), to the CPU
    (CUDA's TF32 convolutions would blur the comparison); the shared final affine map gets random values
    first, since a freshly initialised block is the identity, which any candidate would match."""
    original, candidate = copy.deepcopy((original, candidate))
    original.to("cpu", dtype), candidate.to("cpu", dtype)
    generator = torch.Generator().manual_seed(0)
    final = candidate.norm if candidate.norm is not None else candidate.out
    sizes = {1: (8,), 2: (4, 4), 3: (2, 4, 4)}[candidate.dims]
    with torch.no_grad():
        for p in final.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
        x = torch.randn(2, candidate.in_channels, *sizes, generator=generator, dtype=dtype)
        # The original is the user's code: a dropout in it draws from the global generator, which the
        # caller's seeded run should find as it left it (a thread drawing during these calls is rewound).
        with torch.random.fork_rng(devices=[]):
            for training in (False, True):
                original.train(training), candidate.train(training)
                try:
                    expected = original(x)
                except Exception:
                    if may_decline:  # not a verdict: the next precision probes it (and reports what it raises)
                        return None
                    raise
                if not isinstance(expected, torch.Tensor):
                    return False
                if expected.dtype != dtype and may_decline:
                    return None
                got = candidate(x)
                if expected.shape != got.shape:
                    return False
                difference = (expected.to(dtype) - got).abs().max()
                if not difference <= tolerance * expected.abs().max():  # (NaN: not <=)
                    return False
    return True


def nonlocal_from_module(module: nn.Module) -> Optional[NonLocalBlock]:
    """The NonLocalBlock equal to a hand-written nonlocal block (sharing its submodules), or None where
    the module does not have a nonlocal block's parts. Raises RuntimeError (fastvid.convert reports it
    as a warning) where it has them but no form of NonLocalBlock matched: the probe raised for some, or
    the outputs differ (a variant fastvid does not compute: a scaled softmax, a dropout, another step)."""
    if isinstance(module, NonLocalBlock):
        return None
    candidates = _candidates_pytorchvideo(module) + _candidates_standalone(module)
    failures = []
    for candidate in candidates:
        try:
            if _probe_matches(module, candidate):
                return candidate.train(module.training)
        except Exception as error:  # collected and raised below: a probe that fails is not a silent "no match"
            failures.append(f"{candidate.mode}: {type(error).__name__}: {error}")
    if failures:
        raise RuntimeError("the probe input raised (" + "; ".join(failures) + ")")
    if candidates:
        raise RuntimeError("it has a nonlocal block's parts, but its output differs from NonLocalBlock's in every "
                           f"form tried ({', '.join(c.mode for c in candidates)}), in eval or training mode")
    return None
