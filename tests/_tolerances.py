"""The tolerance rule of the test suite, in one place.

Every result is compared with an *oracle*: the same math written plainly in PyTorch and run in
float64 on the very values the code under test saw (inputs and upstream gradients rounded to the
test dtype first), so input rounding is not counted against the kernel.

float64 / float32 — ``assert_full_precision`` / ``full_precision_tol(dtype, scale)``:
``rtol = FULL_PRECISION_ULPS · eps(dtype)``, ``atol = rtol · max|oracle|`` (2^7 ulps: a
reduction summed in another order, ~1.5e-5 in fp32, ~3e-14 in fp64; a test of long sums or many
recurrent steps says why it needs more and asks for it with ``ulps=``).

bfloat16 / float16 — the flash-attention rule, ``assert_low_precision``:

    max|ours - oracle| <= 2 · max|yardstick - oracle| + ulps · eps(dtype) · max|oracle|

The *yardstick* is what an honest implementation in that dtype gets, and it must not itself be
garbage: it is PyTorch's math run in float32 or float64 on the same rounded inputs and rounded to
the low-precision dtype the way the kernels store results (``rounded_like_kernel``), never a native
run in bf16/fp16 whose own kernel may be wrong (PyTorch's bf16 channels_last_3d depthwise weight
gradient returns 6e36 where the answer is 0). A yardstick further than ``YARDSTICK_ULPS`` from
the oracle fails the test instead of widening the bound. ``ulps`` (default 1 ulp of the largest
oracle value) is the slack for a tensor the yardstick happens to get almost exact; a test that
needs more says why (e.g. gradients through activations cached in bf16).

A result that cancels to ~0 (attention's grad q with one key; a bias the softmax ignores) carries the
rounding noise of the terms that cancelled, not of its own size: such a test passes ``scale=``, the
magnitude of those terms (e.g. the largest of the op's gradients), in place of ``max|oracle|``.
"""
from __future__ import annotations

import torch

FULL_PRECISION_ULPS = 2.0 ** 7
YARDSTICK_ULPS = 4.0
TINY = 1e-30  # the scale of an all-zero oracle: then only an exact result passes


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def full_precision_tol(dtype: torch.dtype, scale: float = 1.0, ulps: float = FULL_PRECISION_ULPS) -> dict:
    """``assert_close`` keyword arguments for a float32 / float64 result whose largest value is ``scale``."""
    return dict(rtol=ulps * eps(dtype), atol=ulps * eps(dtype) * max(scale, TINY))


def rounded_like_kernel(result: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32/float64 result stored in ``dtype`` once, as the kernels store theirs."""
    return result.detach().to(dtype)


def _max_error(a: torch.Tensor, oracle64: torch.Tensor) -> float:
    return (a.detach().double() - oracle64).abs().max().item()


def low_precision_bound(oracle: torch.Tensor, yardstick: torch.Tensor, dtype: torch.dtype, ulps: float = 1.0,
                        what: str = "result", scale: float | None = None) -> float:
    """The largest error the flash-attention rule allows (see the module docstring)."""
    oracle64 = oracle.detach().double()
    assert oracle64.numel() == 0 or bool(torch.isfinite(oracle64).all()), f"{what}: the oracle is not finite"
    if oracle64.numel() == 0:
        return 0.0
    scale = max(oracle64.abs().max().item() if scale is None else scale, TINY)
    err_yardstick = _max_error(yardstick, oracle64)
    assert err_yardstick <= YARDSTICK_ULPS * eps(dtype) * scale, (
        f"{what}: the yardstick itself is off by {err_yardstick:.3g} (> {YARDSTICK_ULPS} ulps of {scale:.3g}); "
        "it cannot judge the kernel")
    return 2 * err_yardstick + ulps * eps(dtype) * scale


def assert_low_precision(actual: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, what: str = "result",
                         yardstick: torch.Tensor | None = None, ulps: float = 1.0, scale: float | None = None) -> None:
    """The flash-attention rule for a bf16/fp16 ``actual`` (module docstring). Without a ``yardstick``
    it is the oracle itself rounded to ``dtype``: right for an op that rounds once, at its output."""
    if yardstick is None:
        yardstick = rounded_like_kernel(oracle, dtype)
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert tuple(actual.shape) == tuple(oracle.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values"
    bound = low_precision_bound(oracle, yardstick, dtype, ulps, what, scale)
    err = _max_error(actual, oracle.detach().double())
    assert err <= bound, f"{what}: {dtype} error {err:.3g} > allowed {bound:.3g} (flash-attention rule)"


def assert_full_precision(actual: torch.Tensor, oracle: torch.Tensor, what: str = "result",
                          ulps: float = FULL_PRECISION_ULPS, scale: float | None = None) -> None:
    """float32 / float64 ``actual`` against the float64 ``oracle``; atol is scaled by ``scale``, by default
    the oracle's largest value (pass the magnitude of the summed terms where the result cancels to ~0)."""
    oracle64 = oracle.detach().double()
    if scale is None:
        scale = oracle64.abs().max().item() if oracle64.numel() else 1.0
    torch.testing.assert_close(actual.detach().double(), oracle64, **full_precision_tol(actual.dtype, scale, ulps),
                               msg=lambda m: f"{what}: {m}")
