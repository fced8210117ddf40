"""Triton kernels for depthwise 3D convolution, registered as PyTorch ops.

Installed as ``fastvid.triton_kernels.depthwise3d``. The math and conventions are those of
``fastvid/reference/depthwise3d.py`` (the oracle, ``F.conv3d(..., groups=C)``): ``input``
``[B, C, T, H, W]``, ``weight`` ``[C*m, 1, kT, kH, kW]`` (channel multiplier m, output channel o
reads input channel ``o // m``), ``bias`` ``[C*m]`` or None, zero padding, kernel sizes 1..7.

Direct stencils over contiguous NCDHW tensors (the wrappers make inputs contiguous; outputs are
contiguous), 64-bit offsets, fp32 accumulation (fp64 for float64 tensors), results stored in the
input dtype:

* forward: one lane per output element, the taps unrolled (``tl.static_range``);
* input gradient: one lane per input element, gathering the output positions that read it
  (a tap contributes when ``t + p - k*d`` is a non-negative multiple of the stride);
* weight / bias gradient: grid ``(m*C, taps, splits)``; each program reduces one tap of one output
  channel over a slice of the ``B*To*Ho*Wo`` output positions into an accumulator-dtype partial,
  the partials are summed in PyTorch (deterministic, no atomics).

Ops (``mutates_args=()``):

* ``fastvid::triton_depthwise_conv3d(input, weight, bias?, stride, padding, dilation) -> Tensor``
  (with autograd)
* ``fastvid::triton_depthwise_conv3d_backward(grad_output, input, weight, stride, padding,
  dilation, output_mask) -> (grad_input, grad_weight, grad_bias)``; outputs not asked for by
  ``output_mask`` come back as empty tensors; no double backward.

Without Triton the module still imports, with ``AVAILABLE = False`` and none of the above defined.
Interpreter notes (fake tensors skip the launch; ops stay opaque under functionalization; bf16
stores round by hand) are in ``_common.py``.
"""
from typing import List, Optional, Tuple

import torch

from ._common import AVAILABLE, tl, triton

__all__ = ["AVAILABLE", "BLOCK_SIZE", "MAX_KERNEL", "depthwise_conv3d", "depthwise_conv3d_backward"]

# Elements per program. Module-level so tests can shrink it to exercise many programs.
BLOCK_SIZE = 256
# Most programs a weight-gradient tap is split over (the partial sums are added in PyTorch).
MAX_SPLITS = 64
MAX_KERNEL = 7


def _triple(v):
    if isinstance(v, int):
        return (v, v, v)
    v = tuple(int(x) for x in v)
    return v * 3 if len(v) == 1 else v


def _output_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


if AVAILABLE:
    from torch._subclasses.fake_tensor import is_fake
    from torch.library import wrap_triton  # bare name: torch's kernel discovery looks for it

    from . import _common
    from ._common import FIX_BF16 as _FIX_BF16
    from ._common import check_tensor as _check_tensor, ld as _ld, register_ops
    from ._common import should_launch as _launch, st as _st

    # ------------------------------------------------------------------------------ kernels
    @triton.jit
    def _dw3d_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, C, M, T, H, W, TO, HO, WO,
                         sT, sH, sW, pT, pH, pW, dT, dH, dW,
                         KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                         HAS_BIAS: tl.constexpr, IS64: tl.constexpr, FIX_BF16: tl.constexpr,
                         BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        ow = offs % WO
        r = offs // WO
        oh = r % HO
        r = r // HO
        ot = r % TO
        r = r // TO
        CM = tl.cast(C, tl.int64) * M
        o = r % CM
        b = r // CM
        c = o // M
        x_base = (b * C + c) * T * H * W
        w_base = o * (KT * KH * KW)
        if IS64:
            acc = tl.zeros([BLOCK], dtype=tl.float64)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
        for kt in tl.static_range(KT):
            it = ot * sT - pT + kt * dT
            mt = mask & (it >= 0) & (it < T)
            for kh in tl.static_range(KH):
                ih = oh * sH - pH + kh * dH
                mh = mt & (ih >= 0) & (ih < H)
                for kw in tl.static_range(KW):
                    iw = ow * sW - pW + kw * dW
                    m = mh & (iw >= 0) & (iw < W)
                    xv = _ld(x_ptr + x_base + (it * H + ih) * W + iw, m, IS64)
                    wv = _ld(w_ptr + w_base + ((kt * KH + kh) * KW + kw), mask, IS64)
                    acc += xv * wv
        if HAS_BIAS:
            acc += _ld(b_ptr + o, mask, IS64)
        _st(y_ptr + offs, acc, mask, FIX_BF16)

    @triton.jit
    def _dw3d_bwd_input_kernel(go_ptr, w_ptr, gi_ptr, N, C, M, T, H, W, TO, HO, WO,
                               sT, sH, sW, pT, pH, pW, dT, dH, dW,
                               KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                               IS64: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        iw = offs % W
        r = offs // W
        ih = r % H
        r = r // H
        it = r % T
        r = r // T
        c = r % C
        b = r // C
        CM = tl.cast(C, tl.int64) * M
        if IS64:
            acc = tl.zeros([BLOCK], dtype=tl.float64)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(0, M):
            o = c * M + j
            go_base = (b * CM + o) * TO * HO * WO
            w_base = o * (KT * KH * KW)
            for kt in tl.static_range(KT):
                nt = it + pT - kt * dT
                ntc = tl.where(nt >= 0, nt, 0)
                ot = ntc // sT
                mt = mask & (nt >= 0) & (ntc - ot * sT == 0) & (ot < TO)
                for kh in tl.static_range(KH):
                    nh = ih + pH - kh * dH
                    nhc = tl.where(nh >= 0, nh, 0)
                    oh = nhc // sH
                    mh = mt & (nh >= 0) & (nhc - oh * sH == 0) & (oh < HO)
                    for kw in tl.static_range(KW):
                        nw = iw + pW - kw * dW
                        nwc = tl.where(nw >= 0, nw, 0)
                        ow = nwc // sW
                        m = mh & (nw >= 0) & (nwc - ow * sW == 0) & (ow < WO)
                        gv = _ld(go_ptr + go_base + (ot * HO + oh) * WO + ow, m, IS64)
                        wv = _ld(w_ptr + w_base + ((kt * KH + kh) * KW + kw), mask, IS64)
                        acc += gv * wv
        _st(gi_ptr + offs, acc, mask, FIX_BF16)

    @triton.jit
    def _dw3d_bwd_weight_kernel(go_ptr, x_ptr, gw_ptr, gb_ptr, NP, CHUNK, C, M, T, H, W,
                                TO, HO, WO, sT, sH, sW, pT, pH, pW, dT, dH, dW,
                                KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                                HAS_BIAS: tl.constexpr, IS64: tl.constexpr, BLOCK: tl.constexpr):
        # Program (o, tap, split): partial Σ go[b, o, ot, oh, ow] · x[b, o // M, it, ih, iw] over
        # output positions [split*CHUNK, (split+1)*CHUNK) ∩ [0, NP), NP = B*TO*HO*WO.
        o = tl.program_id(0).to(tl.int64)
        tap = tl.program_id(1)
        split = tl.program_id(2).to(tl.int64)
        KK: tl.constexpr = KT * KH * KW
        CM = tl.cast(C, tl.int64) * M
        kt = tap // (KH * KW)
        kh = (tap // KW) % KH
        kw = tap % KW
        c = o // M
        SP = tl.cast(TO, tl.int64) * HO * WO  # one channel's output positions: may pass 2^31
        lo = split * CHUNK
        hi = tl.minimum(lo + CHUNK, NP)
        if IS64:
            acc = tl.zeros([BLOCK], dtype=tl.float64)
            bacc = tl.zeros([BLOCK], dtype=tl.float64)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            bacc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(lo, hi, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            mask = pos < hi
            ow = pos % WO
            r = pos // WO
            oh = r % HO
            r = r // HO
            ot = r % TO
            b = r // TO
            it = ot * sT - pT + kt * dT
            ih = oh * sH - pH + kh * dH
            iw = ow * sW - pW + kw * dW
            mx = mask & (it >= 0) & (it < T) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            gv = _ld(go_ptr + (b * CM + o) * SP + (ot * HO + oh) * WO + ow, mask, IS64)
            xv = _ld(x_ptr + (b * C + c) * T * H * W + (it * H + ih) * W + iw, mx, IS64)
            acc += gv * xv
            if HAS_BIAS:
                bacc += gv
        tl.store(gw_ptr + (split * CM + o) * KK + tap, tl.sum(acc, axis=0))
        if HAS_BIAS:
            tl.store(gb_ptr + split * CM + o, tl.sum(bacc, axis=0), mask=tap == 0)

    # ------------------------------------------------------------------------------ validation
    def _check_args(fn, input, weight, stride, padding, dilation):
        """Validates input/weight/conv arguments; returns the output spatial size (TO, HO, WO)."""
        _check_tensor(fn, "input", input, 5)
        _check_tensor(fn, "weight", weight, 5)
        if weight.device != input.device:
            raise ValueError(f"{fn}: weight is on {weight.device} but input is on {input.device}")
        if weight.dtype != input.dtype:
            raise TypeError(f"{fn}: weight dtype {weight.dtype} differs from input dtype {input.dtype}")
        C = input.shape[1]
        if C == 0 or weight.shape[1] != 1 or weight.shape[0] == 0 or weight.shape[0] % C != 0:
            raise ValueError(f"{fn}: weight must be [m*C, 1, kT, kH, kW] with C = {C}, "
                             f"got shape {tuple(weight.shape)}")
        k = tuple(weight.shape[2:])
        if any(not 1 <= kk <= MAX_KERNEL for kk in k):
            raise ValueError(f"{fn}: kernel sizes must be in 1..{MAX_KERNEL}, got {k}")
        for what, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
            if len(v) != 3 or any(int(x) < lo for x in v):
                raise ValueError(f"{fn}: {what} must be 3 ints >= {lo}, got {tuple(v)}")
        out = tuple(_output_size(input.shape[2 + d], k[d], stride[d], padding[d], dilation[d])
                    for d in range(3))
        if any(n <= 0 for n in out):
            raise ValueError(f"{fn}: input {tuple(input.shape)} is too small for kernel {k} with "
                             f"stride {tuple(stride)}, padding {tuple(padding)}, dilation "
                             f"{tuple(dilation)} (output size {out})")
        return out

    def _acc_dtype(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    def _conv_scalars(input, weight, out, stride, padding, dilation):
        _, C, T, H, W = input.shape
        return (C, weight.shape[0] // C, T, H, W, *out, *stride, *padding, *dilation)

    # ------------------------------------------------------------------------------ op bodies
    def _fwd_impl(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  stride: List[int], padding: List[int], dilation: List[int]) -> torch.Tensor:
        fn = "triton_depthwise_conv3d"
        stride, padding, dilation = _triple(stride), _triple(padding), _triple(dilation)
        out = _check_args(fn, input, weight, stride, padding, dilation)
        CM = weight.shape[0]
        if bias is not None:
            _check_tensor(fn, "bias", bias, 1)
            if bias.device != input.device or bias.dtype != input.dtype or bias.shape[0] != CM:
                raise ValueError(f"{fn}: bias must be [{CM}] with input's dtype and device, got "
                                 f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
            bias = bias.contiguous()
        input, weight = input.contiguous(), weight.contiguous()
        y = torch.empty((input.shape[0], CM, *out), dtype=input.dtype, device=input.device)
        N = y.numel()
        if _launch(N, input):
            KT, KH, KW = weight.shape[2:]
            with _common.device_guard(input):
                wrap_triton(_dw3d_fwd_kernel)[(triton.cdiv(N, BLOCK_SIZE),)](
                    input, weight, bias if bias is not None else weight, y, N,
                    *_conv_scalars(input, weight, out, stride, padding, dilation),
                    KT=KT, KH=KH, KW=KW, HAS_BIAS=bias is not None,
                    IS64=input.dtype == torch.float64, FIX_BF16=_FIX_BF16, BLOCK=BLOCK_SIZE)
        return y

    def _bwd_impl(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                  stride: List[int], padding: List[int], dilation: List[int],
                  output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = "triton_depthwise_conv3d_backward"
        stride, padding, dilation = _triple(stride), _triple(padding), _triple(dilation)
        out = _check_args(fn, input, weight, stride, padding, dilation)
        _check_tensor(fn, "grad_output", grad_output, 5)
        B, CM = input.shape[0], weight.shape[0]
        if tuple(grad_output.shape) != (B, CM, *out) or grad_output.device != input.device:
            raise ValueError(f"{fn}: grad_output must have shape {(B, CM, *out)} on {input.device}, "
                             f"got {tuple(grad_output.shape)} on {grad_output.device}")
        grad_output = grad_output.to(input.dtype).contiguous()
        input, weight = input.contiguous(), weight.contiguous()
        KT, KH, KW = weight.shape[2:]
        scalars = _conv_scalars(input, weight, out, stride, padding, dilation)
        is64 = input.dtype == torch.float64
        launch = _launch(grad_output.numel(), input)
        want_input, want_weight, want_bias = (bool(x) for x in output_mask)

        grad_input = input.new_empty(0)
        if want_input:
            grad_input = torch.empty_like(input)
            N = input.numel()
            if launch and N:
                with _common.device_guard(input):
                    wrap_triton(_dw3d_bwd_input_kernel)[(triton.cdiv(N, BLOCK_SIZE),)](
                        grad_output, weight, grad_input, N, *scalars, KT=KT, KH=KH, KW=KW,
                        IS64=is64, FIX_BF16=_FIX_BF16, BLOCK=BLOCK_SIZE)
            elif not launch and N and grad_output.numel() == 0 and not is_fake(input):
                grad_input.zero_()

        grad_weight = input.new_empty(0)
        grad_bias = input.new_empty(0)
        if want_weight or want_bias:
            acc = _acc_dtype(input.dtype)
            NP = B * out[0] * out[1] * out[2]
            splits = max(1, min(triton.cdiv(NP, BLOCK_SIZE), MAX_SPLITS))
            chunk = triton.cdiv(triton.cdiv(NP, splits), BLOCK_SIZE) * BLOCK_SIZE
            KK = KT * KH * KW
            gw = torch.zeros((splits, CM, KK), dtype=acc, device=input.device)
            gb = torch.zeros((splits, CM), dtype=acc, device=input.device)
            if launch:
                with _common.device_guard(input):
                    wrap_triton(_dw3d_bwd_weight_kernel)[(CM, KK if want_weight else 1, splits)](
                        grad_output, input, gw, gb, NP, chunk, *scalars, KT=KT, KH=KH, KW=KW,
                        HAS_BIAS=want_bias, IS64=is64, BLOCK=BLOCK_SIZE)
            if want_weight:
                grad_weight = gw.sum(0).reshape(weight.shape).to(input.dtype)
            if want_bias:
                grad_bias = gb.sum(0).to(input.dtype)
        return grad_input, grad_weight, grad_bias

    # ------------------------------------------------------------------------------ autograd
    def _setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation = inputs
        ctx.save_for_backward(input, weight)
        ctx.args = (list(stride), list(padding), list(dilation), bias is not None)
        ctx.bias_dtype = bias.dtype if bias is not None else None

    def _autograd_backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.args
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        if grad_output is None or not any(mask):
            return None, None, None, None, None, None
        gi, gw, gb = torch.ops.fastvid.triton_depthwise_conv3d_backward(
            grad_output, input, weight, stride, padding, dilation, mask)
        return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
                None, None, None)

    def _setup_none(ctx, inputs, output):
        pass

    # ------------------------------------------------------------------------------ registration
    register_ops((("triton_depthwise_conv3d", _fwd_impl, _autograd_backward, _setup_context),
                  ("triton_depthwise_conv3d_backward", _bwd_impl, None, _setup_none)))

    # ------------------------------------------------------------------------------ public API
    def depthwise_conv3d(input, weight, bias=None, stride=(1, 1, 1), padding=(0, 0, 0),
                         dilation=(1, 1, 1)):
        """``F.conv3d(input, weight, bias, stride, padding, dilation, groups=C)`` (contiguous
        output in the input dtype); differentiable in input, weight and bias."""
        return torch.ops.fastvid.triton_depthwise_conv3d(
            input, weight, bias, list(_triple(stride)), list(_triple(padding)), list(_triple(dilation)))

    def depthwise_conv3d_backward(grad_output, input, weight, stride=(1, 1, 1), padding=(0, 0, 0),
                                  dilation=(1, 1, 1), output_mask=(True, True, True)):
        """Returns ``(grad_input, grad_weight, grad_bias)``; unrequested ones are empty tensors."""
        return torch.ops.fastvid.triton_depthwise_conv3d_backward(
            grad_output, input, weight, list(_triple(stride)), list(_triple(padding)),
            list(_triple(dilation)), [bool(x) for x in output_mask])
