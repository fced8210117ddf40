"""Nonlocal (spatio-temporal self-) attention: functional API and the Python side of the custom ops.

``nonlocal_attention(q, k, v, scale)`` = ``softmax(scale · q kᵀ) v`` computed tile by tile with an
online softmax (flash-attention-2 style): forward saves only the output and the per-row
log-sum-exp, backward recomputes the tiles, so memory is linear in N and M. On the CPU,
``save_scores=True`` trades that for speed: the forward also keeps the scores ``scale · q kᵀ``
(``B·N·M`` fp32 values) and the backward reads them instead of recomputing them (one of the seven
N×M×D products fewer; the same results, bit for bit). Backends:

* ``cpu``: ``torch.ops.fastvid.nonlocal_attention`` (+ ``_backward``), the C++ kernel in
  ``csrc/attention/attention_cpu.cpp`` (tiles multiplied by its own fp32 GEMM on the AVX-512 / AVX2
  paths, else MKL's; lazily rescaled running max, softmax vectorised; bf16 tiles only on CPUs with
  AMX-BF16, else the fp32 kernel on upcast copies);
* ``cuda``: PyTorch's fused attention kernels (``F.scaled_dot_product_attention``: flash /
  memory-efficient / cuDNN, which PyTorch picks) — fastvid has no CUDA attention kernel of its own;
  where SDPA would fall back to its quadratic-memory math path (see :func:`cuda_attention_kernel`)
  the Triton kernel runs instead;
* ``triton``: ``triton_kernels/attention.py``;
* ``reference``: ``fastvid/reference/attention.py`` (materialises the N×M matrix).

Two nonlocal variants whose affinities are not a softmax get memory-aware paths here too:
:func:`dot_product_attention` (Wang et al.'s dot product: ``(q kᵀ / M) v`` computed as
``q (kᵀ v) / M``) and :func:`concatenation_attention` (``ReLU(a_i + b_j) / M``, query chunks
recomputed in backward).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic
from torch.utils.checkpoint import checkpoint

from .. import _backend
from ._common import autocast_inputs, check_one_device, double_backward_unsupported, require_tensors
from ..reference import attention as ref

__all__ = ["nonlocal_attention", "dot_product_attention", "concatenation_attention", "cuda_attention_kernel"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast(q, k, v):
    """q, k, v in the autocast dtype where autocast is on, before the argument checks (under autocast the
    three often differ: one from a projection run in bf16, the others as stored)."""
    return autocast_inputs(q.device.type, q, k, v) if isinstance(q, Tensor) else (q, k, v)


def _check_attention_args(op, q, k, v, empty_queries=False):
    """empty_queries: N = 0 is allowed (the public ops: an empty result, as SDPA's); the raw ops refuse it."""
    require_tensors(op, q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"fastvid.{op}: {name} must be 3-D [B, rows, dim] (4-D with heads before "
                             f"folding), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"fastvid.{op}: {name} must be a floating tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"fastvid.{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"fastvid.{op}: q, k, v must have the same batch size, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"fastvid.{op}: q and k must have the same last dim D, got q {tuple(q.shape)} and "
                         f"k {tuple(k.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"fastvid.{op}: k and v must have the same number of rows M, got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    if q.shape[2] == 0 or v.shape[2] == 0:
        raise ValueError(f"fastvid.{op}: q and k need a positive last dim D (the default scale is 1/sqrt(D)) and v "
                         f"a positive Dv, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0:  # a softmax over no keys has no value
        raise ValueError(f"fastvid.{op}: need at least one key, got M = 0 (k {tuple(k.shape)})")
    if q.shape[1] == 0 and not empty_queries:
        raise ValueError(f"fastvid.{op}: need at least one query and one key, got N = {q.shape[1]}, "
                         f"M = {k.shape[1]}")


# ------------------------------------------------------------------------------ fake kernels + autograd
def _has_cpu_op() -> bool:
    return _backend.cpu_kernels() and hasattr(torch.ops.fastvid, "nonlocal_attention")


if _has_cpu_op():
    @torch.library.register_fake("fastvid::nonlocal_attention")
    def _(q, k, v, scale, save_scores=False):
        check_one_device("nonlocal_attention", q=q, k=k, v=v)
        _check_attention_args("nonlocal_attention", q, k, v)
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        lse = q.new_empty(q.shape[0], q.shape[1], dtype=_lse_dtype(q.dtype))
        scores = q.new_empty((q.shape[0], q.shape[1], k.shape[1]) if save_scores else (0,), dtype=_lse_dtype(q.dtype))
        return out, lse, scores

    @torch.library.register_fake("fastvid::nonlocal_attention_backward")
    def _(grad_out, grad_lse, q, k, v, out, lse, scale, scores=None):
        check_one_device("nonlocal_attention_backward", grad_out=grad_out, grad_lse=grad_lse, q=q, k=k, v=v,
                         out=out, lse=lse, scores=scores)
        _check_attention_args("nonlocal_attention_backward", q, k, v)
        return torch.empty_like(q, memory_format=torch.contiguous_format), \
            torch.empty_like(k, memory_format=torch.contiguous_format), \
            torch.empty_like(v, memory_format=torch.contiguous_format)

    def _setup(ctx, inputs, output):
        q, k, v, scale = inputs[:4]
        out, lse, scores = output
        ctx.mark_non_differentiable(scores)  # the backward's input, not a result to differentiate
        # Outputs without a gradient reach the backward as None, not as zeros: materialised, the scores'
        # zero gradient alone was B·N·M values written per call.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, scores if scores.numel() > 0 else None)
        ctx.scale = scale

    def _backward(ctx, grad_out, grad_lse, _grad_scores):
        q, k, v, out, lse, scores = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_q, grad_k, grad_v = torch.ops.fastvid.nonlocal_attention_backward(
            grad_out, grad_lse, q, k, v, out, lse, ctx.scale, scores)
        return grad_q, grad_k, grad_v, None, None

    torch.library.register_autograd("fastvid::nonlocal_attention", _backward, setup_context=_setup)
    torch.library.register_autograd("fastvid::nonlocal_attention_backward",
                                    double_backward_unsupported("nonlocal_attention_backward"))


# Widest head dim PyTorch's fused SDPA kernels (flash, memory-efficient, cuDNN) are relied on for.
SDPA_MAX_HEAD_DIM = 256


def cuda_attention_kernel(dtype: torch.dtype, head_dim: int, value_dim: int, capability) -> str:
    """Which kernel the ``cuda`` backend runs for nonlocal attention: ``"sdpa"``
    (``F.scaled_dot_product_attention``) or ``"triton"`` (fastvid's kernel, linear memory).

    SDPA has fused kernels for fp16/bf16/fp32 with head dims up to 256; anything else (fp64, wider
    heads such as Nonlocal I3D's res4 blocks with D = 512) goes to its math path, which stores the
    N×M affinity matrix. Those cases run the Triton kernel, except bf16 before sm_80 (``capability``
    is ``(major, minor)``), where Triton has no bf16 ``tl.dot`` either."""
    if dtype == torch.bfloat16 and tuple(capability) < (8, 0):
        return "sdpa"
    if dtype == torch.float64 or max(head_dim, value_dim) > SDPA_MAX_HEAD_DIM:
        return "triton"
    return "sdpa"


def _triton_attention(q, k, v, scale):
    from ..triton_kernels import attention  # noqa: F401  (registers the op; importing triton is slow)
    return torch.ops.fastvid.triton_nonlocal_attention(q, k, v, scale)


# ------------------------------------------------------------------------------ public ops
def _fold_heads(op, q, k, v):
    """``(heads, q, k, v)``: 4-D ``[B, heads, rows, dim]`` operands folded to 3-D (heads = their
    ``[B, heads]``), 3-D ones as they are (heads None)."""
    if not (isinstance(q, Tensor) and q.dim() == 4):
        return None, q, k, v
    if not (isinstance(k, Tensor) and isinstance(v, Tensor) and k.dim() == 4 and v.dim() == 4):
        raise ValueError(f"fastvid.{op}: with a heads dimension q, k and v must all be 4-D [B, heads, rows, dim]")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise ValueError(f"fastvid.{op}: q, k, v must agree in [B, heads], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return q.shape[:2], q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)


def nonlocal_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, *,
                       save_scores: bool = False) -> Tensor:
    """``softmax(scale · q kᵀ, dim=-1) v`` without materialising the N×M affinity matrix.

    ``q`` ``[B, N, D]``, ``k`` ``[B, M, D]``, ``v`` ``[B, M, Dv]``, or with a heads dimension
    ``[B, heads, N, D]`` etc.; returns ``[B, N, Dv]`` (``[B, heads, N, Dv]``). ``scale`` defaults to
    ``1/sqrt(D)``; the nonlocal block of Wang et al. uses 1. fp32 / fp64 / bf16 / fp16 (on the CPU,
    fp16, and bf16 without AMX-BF16, run the fp32 kernel on upcast copies); low precision
    accumulates in fp32. Rows of q, k, v
    may be strided either way (``[B, N, D]`` with unit stride along D or along N: a channels-first
    projection's transpose is read without a copy).

    ``save_scores`` (CPU kernel; other backends ignore it): where a gradient will be taken, the
    forward keeps the scores ``scale · q kᵀ`` for the backward, ``B·heads·N·M`` fp32 values (fp64 for
    fp64), instead of recomputing them there: ~9 % less time forward+backward at B = 2, N = 6272,
    M = 1568, D = 128 (README), the same results bit for bit, memory no longer linear in N·M."""
    if has_torch_function_variadic(q, k, v):
        return handle_torch_function(nonlocal_attention, (q, k, v), q, k, v, scale, save_scores=save_scores)
    if not isinstance(save_scores, bool):
        raise TypeError(f"fastvid.nonlocal_attention: save_scores must be a bool, got {type(save_scores).__name__}")
    q, k, v = _autocast(q, k, v)
    heads, q, k, v = _fold_heads("nonlocal_attention", q, k, v)
    _check_attention_args("nonlocal_attention", q, k, v, empty_queries=True)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = float(scale)
    which = _backend.resolve({"q": q, "k": k, "v": v})
    if q.shape[1] == 0:  # no queries: the empty result (k and v get zero gradients); no kernel launch
        out = ref.nonlocal_attention(q, k, v, scale)[0]
    elif which == "cpu" and _has_cpu_op():
        # Scores only where a backward will read them: not under no_grad, for inputs without gradients, or
        # in a torch.export trace (the choice would be frozen into a program mostly run without autograd).
        keep = (save_scores and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
                and not torch.compiler.is_exporting())
        if q.dtype == torch.float16:  # the CPU kernel has no fp16 GEMM: compute in fp32, return fp16
            out = torch.ops.fastvid.nonlocal_attention(q.float(), k.float(), v.float(), scale, keep)[0].half()
        else:
            out = torch.ops.fastvid.nonlocal_attention(q, k, v, scale, keep)[0]
    elif which == "cuda":
        if _backend.triton_importable() and cuda_attention_kernel(
                q.dtype, q.shape[-1], v.shape[-1], torch.cuda.get_device_capability(q.device)) == "triton":
            out = _triton_attention(q, k, v, scale)[0]
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    elif which == "triton":
        out = _triton_attention(q, k, v, scale)[0]
    else:
        out = ref.nonlocal_attention(q, k, v, scale)[0]
    return out if heads is None else out.unflatten(0, heads)


def dot_product_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Wang et al.'s dot-product nonlocal: ``(q kᵀ / M) v`` for ``[B, N, D]``, ``[B, M, D]``,
    ``[B, M, Dv]`` (or ``[B, heads, ...]``, as nonlocal_attention takes them), computed as
    ``q (kᵀ v) / M``: no N×M matrix, O(N·D·Dv) work."""
    if has_torch_function_variadic(q, k, v):
        return handle_torch_function(dot_product_attention, (q, k, v), q, k, v)
    q, k, v = _autocast(q, k, v)
    heads, q, k, v = _fold_heads("dot_product_attention", q, k, v)
    _check_attention_args("dot_product_attention", q, k, v, empty_queries=True)
    out = torch.matmul(q, torch.matmul(k.transpose(1, 2), v)) / k.shape[1]
    return out if heads is None else out.unflatten(0, heads)


def _concatenation_chunk(query_scores: Tensor, key_scores: Tensor, v: Tensor) -> Tensor:
    affinity = torch.relu(query_scores.unsqueeze(2) + key_scores.unsqueeze(1))  # [B, n, M]
    return torch.matmul(affinity, v) / key_scores.shape[1]


def concatenation_attention(query_scores: Tensor, key_scores: Tensor, v: Tensor,
                            max_chunk_elements: int = 1 << 22) -> Tensor:
    """Wang et al.'s concatenation nonlocal: ``y_i = Σ_j ReLU(a_i + b_j) v_j / M`` where
    ``a = θ·w_θ`` ``[B, N]`` and ``b = φ·w_φ`` ``[B, M]`` are the two halves of ``w_fᵀ[θ_i, φ_j]``.

    The ReLU of a sum is not a softmax, so the tiled kernel cannot compute it; instead the queries
    are processed in chunks of at most ``max_chunk_elements`` affinities, each chunk recomputed in
    backward (activation checkpointing): peak memory is one chunk, not N×M."""
    if has_torch_function_variadic(query_scores, key_scores, v):
        return handle_torch_function(concatenation_attention, (query_scores, key_scores, v), query_scores, key_scores,
                                     v, max_chunk_elements)
    require_tensors("concatenation_attention", query_scores=query_scores, key_scores=key_scores, v=v)
    if query_scores.dim() != 2 or key_scores.dim() != 2 or v.dim() != 3:
        raise ValueError("fastvid.concatenation_attention: expected query_scores [B, N], key_scores [B, M], "
                         f"v [B, M, Dv], got {tuple(query_scores.shape)}, {tuple(key_scores.shape)}, "
                         f"{tuple(v.shape)}")
    # (unchecked, a batch or M mismatch gave PyTorch's bmm errors, mixed dtypes a silent promotion and
    # M = 0 a NaN result: the mean over no keys)
    if not (query_scores.shape[0] == key_scores.shape[0] == v.shape[0]) or key_scores.shape[1] != v.shape[1]:
        raise ValueError("fastvid.concatenation_attention: query_scores [B, N], key_scores [B, M] and v [B, M, Dv] "
                         f"must agree in B and M, got {tuple(query_scores.shape)}, {tuple(key_scores.shape)}, "
                         f"{tuple(v.shape)}")
    if not (query_scores.dtype == key_scores.dtype == v.dtype) or not v.is_floating_point():
        raise TypeError("fastvid.concatenation_attention: query_scores, key_scores and v must share a floating "
                        f"dtype, got {query_scores.dtype}, {key_scores.dtype}, {v.dtype}")
    if key_scores.shape[1] == 0:
        raise ValueError(f"fastvid.concatenation_attention: need at least one key, got M = 0 (v {tuple(v.shape)})")
    B, N = query_scores.shape
    M = key_scores.shape[1]
    rows = max(1, max_chunk_elements // max(1, B * M))
    if rows >= N:
        return _concatenation_chunk(query_scores, key_scores, v)
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (query_scores, key_scores, v))
    chunks = []
    for start in range(0, N, rows):
        part = query_scores[:, start:start + rows]
        if track:
            chunks.append(checkpoint(_concatenation_chunk, part, key_scores, v, use_reentrant=False))
        else:
            chunks.append(_concatenation_chunk(part, key_scores, v))
    return torch.cat(chunks, dim=1)
