"""Layer-normalised ConvLSTM / ConvGRU (``norm="layer"``): functional API and the Python side of the
``convlstm_ln_sequence`` / ``convgru_ln_sequence`` ops (fake kernels, autocast; their autograd kernels are
in csrc/autograd.cpp). Equations and the choice of axes: fastvid/reference/recurrent_norm.py.

Backends: 'cpu' runs the C++ time loop with the fused LN + cell kernel (csrc/recurrent/recurrent_norm_*.cpp);
CUDA tensors (and backend('triton')) run the Triton step kernels (triton_kernels/recurrent_norm.py: LN of
both pre-activations + gates + cell (+ LN(c)) in one kernel per step) inside the reference time loop; 'reference' is the plain
PyTorch oracle.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from .. import _backend
from ._common import autocast_inputs, check_one_device
from .recurrent import (_acc, _channels_last, _check_cell_state_dtype, _check_state_shape, _frame, _frames,
                        _needs_grad, _sequence_arguments, _sequence_backend, _triton)
from ..reference import recurrent_norm as ref

__all__ = ["convlstm_ln", "convgru_ln"]

if _backend.cpu_kernels():
    @torch.library.register_fake("fastvid::convlstm_ln_sequence")
    def _(x, weight_ih, weight_hh, bias, h0, c0, gain_ih, gain_hh, gain_c, bias_c, padding, dilation, reverse,
          channels_last, save):
        check_one_device("convlstm_ln_sequence", **locals())  # the arguments
        B, T, Cin, H, W = x.shape
        C = weight_hh.shape[1]
        cl, dev, dt = channels_last, x.device, x.dtype
        acc = _acc(dt)
        cache = (lambda channels, dtype: _frames((B, T), channels, H, W, cl, dtype, dev)) if save else \
            (lambda channels, dtype: x.new_empty(0, dtype=dtype))
        stats = x.new_empty((B, T, 6) if save else (0,), dtype=acc)
        return (_frames((B, T), C, H, W, cl, dt, dev), _frame(B, C, H, W, cl, dt, dev), _frame(B, C, H, W, cl, acc, dev),
                cache(4 * C, dt), cache(4 * C, dt), cache(4 * C, dt), cache(C, acc), stats)

    @torch.library.register_fake("fastvid::convlstm_ln_sequence_backward")
    def _(grad_output, grad_h_n, grad_c_n, x, weight_ih, weight_hh, has_bias, h0, c0, gain_ih, gain_hh, gain_c,
          bias_c, output, x_pre, h_pre, gates, cells, stats, padding, dilation, reverse, channels_last):
        check_one_device("convlstm_ln_sequence_backward", **locals())  # the arguments
        B, T, Cin, H, W = x.shape
        C = weight_hh.shape[1]
        cl, dev, dt = channels_last, x.device, x.dtype
        contiguous = torch.contiguous_format
        return (_frames((B, T), Cin, H, W, cl, dt, dev), torch.empty_like(weight_ih, memory_format=contiguous),
                torch.empty_like(weight_hh, memory_format=contiguous), x.new_empty(4 * C if has_bias else 0),
                _frame(B, C, H, W, cl, dt, dev), _frame(B, C, H, W, cl, c0.dtype, dev),
                torch.empty_like(gain_ih), torch.empty_like(gain_hh), torch.empty_like(gain_c),
                torch.empty_like(bias_c))

    @torch.library.register_fake("fastvid::convgru_ln_sequence")
    def _(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, gain_ih, gain_hh, padding, dilation, reverse, channels_last,
          save):
        check_one_device("convgru_ln_sequence", **locals())  # the arguments
        B, T, Cin, H, W = x.shape
        C = weight_hh.shape[1]
        cl, dev, dt = channels_last, x.device, x.dtype
        cache = (lambda: _frames((B, T), 3 * C, H, W, cl, dt, dev)) if save else (lambda: x.new_empty(0))
        stats = x.new_empty((B, T, 4) if save else (0,), dtype=_acc(dt))
        return _frames((B, T), C, H, W, cl, dt, dev), _frame(B, C, H, W, cl, dt, dev), cache(), cache(), stats

    @torch.library.register_fake("fastvid::convgru_ln_sequence_backward")
    def _(grad_output, grad_h_n, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, gain_ih, gain_hh, output, x_pre, h_pre,
          stats, padding, dilation, reverse, channels_last):
        check_one_device("convgru_ln_sequence_backward", **locals())  # the arguments
        B, T, Cin, H, W = x.shape
        C = weight_hh.shape[1]
        cl, dev, dt = channels_last, x.device, x.dtype
        contiguous = torch.contiguous_format
        return (_frames((B, T), Cin, H, W, cl, dt, dev), torch.empty_like(weight_ih, memory_format=contiguous),
                torch.empty_like(weight_hh, memory_format=contiguous),
                x.new_empty(3 * C if bias_ih is not None else 0), x.new_empty(3 * C if bias_hh is not None else 0),
                _frame(B, C, H, W, cl, dt, dev), torch.empty_like(gain_ih), torch.empty_like(gain_hh))


def _check_norm_params(name, C, gates, **params):
    """The gains/biases must be 1-D of the stated size (a clear error before any kernel runs)."""
    sizes = {"gain_ih": gates * C, "gain_hh": gates * C, "gain_c": C, "bias_c": C}
    for arg, value in params.items():
        if not isinstance(value, Tensor) or value.shape != (sizes[arg],):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"fastvid.{name}: {arg} must be [{sizes[arg]}], got {shape}")


def convlstm_ln(x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Optional[Tensor], h0: Optional[Tensor],
                c0: Optional[Tensor], gain_ih: Tensor, gain_hh: Tensor, gain_c: Tensor, bias_c: Tensor,
                padding=None, dilation=1, reverse: bool = False):
    """One layer-normalised ConvLSTM layer, one direction, over ``x`` ``[B, T, C_in, H, W]``
    (equations: fastvid/reference/recurrent_norm.py). ``bias``: the summed gate bias ``[4C]``, added
    after the norms; ``gain_ih``, ``gain_hh`` ``[4C]``; ``gain_c``, ``bias_c`` ``[C]``.
    Returns ``(output [B, T, C, H, W], h_n, c_n)``; ``c_n`` is fp32 for bf16/fp16 inputs."""
    if has_torch_function_variadic(x, weight_ih, weight_hh, bias, h0, c0, gain_ih, gain_hh, gain_c, bias_c):
        return handle_torch_function(
            convlstm_ln, (x, weight_ih, weight_hh, bias, h0, c0, gain_ih, gain_hh, gain_c, bias_c),
            x, weight_ih, weight_hh, bias, h0, c0, gain_ih, gain_hh, gain_c, bias_c, padding, dilation, reverse)
    C, padding, dilation, h0 = _sequence_arguments("convlstm_ln", 4, x, weight_ih, weight_hh, h0, padding, dilation)
    _check_norm_params("convlstm_ln", C, 4, gain_ih=gain_ih, gain_hh=gain_hh, gain_c=gain_c, bias_c=bias_c)
    _check_state_shape("convlstm_ln", "c0", c0, x, C)
    B, _, _, H, W = x.shape
    if c0 is None:
        c0 = x.new_zeros(B, C, H, W, dtype=_acc(x.dtype))
    x, weight_ih, weight_hh, bias, h0 = autocast_inputs(x.device.type, x, weight_ih, weight_hh, bias, h0)
    _check_cell_state_dtype("convlstm_ln", "c0", c0, "x", x)
    tensors = dict(x=x, weight_ih=weight_ih, weight_hh=weight_hh, bias=bias, h0=h0, c0=c0, gain_ih=gain_ih,
                   gain_hh=gain_hh, gain_c=gain_c, bias_c=bias_c)
    which = _sequence_backend(tensors)
    if which != "cpu":
        cell = _step_cell(which, "ln_lstm_cell")
        return ref.convlstm_ln_sequence(x, weight_ih, weight_hh, bias, h0, c0, gain_ih, gain_hh, gain_c, bias_c,
                                        padding, dilation, reverse, cell=cell)
    save = _needs_grad(*tensors.values())
    output, h_n, c_n, *_ = torch.ops.fastvid.convlstm_ln_sequence(
        x, weight_ih, weight_hh, bias, h0, c0, gain_ih, gain_hh, gain_c, bias_c, padding, dilation, reverse,
        _channels_last(x), save)
    return output, h_n, c_n


def convgru_ln(x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
               bias_hh: Optional[Tensor], h0: Optional[Tensor], gain_ih: Tensor, gain_hh: Tensor, padding=None,
               dilation=1, reverse: bool = False):
    """One layer-normalised ConvGRU layer (``nn.GRU`` form, reset_after), one direction, over ``x``
    ``[B, T, C_in, H, W]`` (equations: fastvid/reference/recurrent_norm.py). ``bias_ih`` / ``bias_hh``
    ``[3C]`` are added after their norms; ``gain_ih``, ``gain_hh`` ``[3C]``. Returns ``(output, h_n)``.
    CUDA tensors run the Triton step kernel in the reference time loop, as for convlstm_ln."""
    if has_torch_function_variadic(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, gain_ih, gain_hh):
        return handle_torch_function(
            convgru_ln, (x, weight_ih, weight_hh, bias_ih, bias_hh, h0, gain_ih, gain_hh),
            x, weight_ih, weight_hh, bias_ih, bias_hh, h0, gain_ih, gain_hh, padding, dilation, reverse)
    C, padding, dilation, h0 = _sequence_arguments("convgru_ln", 3, x, weight_ih, weight_hh, h0, padding, dilation)
    _check_norm_params("convgru_ln", C, 3, gain_ih=gain_ih, gain_hh=gain_hh)
    x, weight_ih, weight_hh, bias_ih, bias_hh, h0 = autocast_inputs(x.device.type, x, weight_ih, weight_hh, bias_ih,
                                                                    bias_hh, h0)
    tensors = dict(x=x, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh, h0=h0,
                   gain_ih=gain_ih, gain_hh=gain_hh)
    which = _sequence_backend(tensors)
    if which != "cpu":
        cell = _step_cell(which, "ln_gru_cell")
        return ref.convgru_ln_sequence(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, gain_ih, gain_hh, padding,
                                       dilation, reverse, cell=cell)
    output, h_n, *_ = torch.ops.fastvid.convgru_ln_sequence(
        x, weight_ih, weight_hh, bias_ih, bias_hh, h0, gain_ih, gain_hh, padding, dilation, reverse,
        _channels_last(x), _needs_grad(*tensors.values()))
    return output, h_n


def _step_cell(which: str, name: str):
    """The step cell of the reference time loop for backend ``which``: Triton's kernel on 'triton', and on
    'cuda' where Triton runs (these ops have no CUDA C++ kernel); else the reference formulas (a CUDA
    build without Triton raised an AttributeError here)."""
    if which == "triton" or (which == "cuda" and _backend.triton_usable()):
        kernels = _triton_norm()
        if kernels.AVAILABLE:
            return getattr(kernels, name)
    return getattr(ref, name)


def _triton_norm():
    _triton()  # the recurrent Triton module first (shared launch helpers)
    from ..triton_kernels import recurrent_norm as tk  # imported lazily: triton import is slow
    return tk
