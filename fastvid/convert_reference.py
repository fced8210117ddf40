"""Plain-PyTorch twins of the fastvid layers, used by ``fastvid.convert(model, to="reference")``.

Each entry of ``TO_REFERENCE`` is (name, replacement(module)) as in ``fastvid.convert.CONVERTERS``:
the replacement (None for other modules) is built only from ``torch.nn`` and the pure-PyTorch
functions of ``fastvid.reference`` (no fastvid op, no compiled extension), with the same parameters
and the same outputs. It lives next to ``convert`` rather than in ``fastvid.reference``: it needs the
fastvid layer classes, and the oracle package imports nothing it checks.
"""
from __future__ import annotations

import copy
import functools
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn.attention_lstm import AttentionConvLSTM
from .nn._build import module_to_fill
from .nn.conv3d import DepthwiseConv3d, check_parameters_shareable
from .nn.nonlocal_block import NonLocalBlock
from .nn.recurrent import ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell, _ConvRNNBase, _no_lengths_with_norm
from .ops._common import autocast_inputs
from .ops.recurrent import _check_lengths
from .reference import recurrent as ref
from .reference import recurrent_norm as ref_norm
from .reference.attention_lstm import attention_convlstm


def depthwise_to_conv3d(module: DepthwiseConv3d) -> nn.Conv3d:
    """``nn.Conv3d(C, m*C, k, groups=C)`` sharing ``module``'s weight and bias."""
    check_parameters_shareable(module)
    conv = module_to_fill(nn.Conv3d, nn.Conv3d, module.channels, module.out_channels, module.kernel_size,
                          module.stride, module.padding, module.dilation, groups=module.channels,
                          bias=module.bias is not None, padding_mode=module.padding_mode)
    conv.weight = module.weight
    conv.bias = module.bias
    return conv.train(module.training)


# ------------------------------------------------------------------------------ recurrent twins
def _autocast(*tensors):
    """What fastvid.ops does under autocast: conv inputs in the autocast dtype (the cell state keeps its own)."""
    return autocast_inputs(next(t.device.type for t in tensors if isinstance(t, Tensor)), *tensors)


class _SharesParameters(nn.Module):
    """Takes over ``module``'s parameters (the same Parameter objects, same names, same order, so
    state dicts match key for key), its buffers and the listed configuration attributes."""

    def __init__(self, module: nn.Module, attributes):
        super().__init__()
        self._repr_attributes = tuple(attributes)
        for name in attributes:
            setattr(self, name, copy.copy(getattr(module, name)))
        for name, param in module._parameters.items():
            self.register_parameter(name, param)
        for name, buf in module._buffers.items():
            self.register_buffer(name, buf, persistent=name not in module._non_persistent_buffers_set)
        self.train(module.training)

    def extra_repr(self):
        return ", ".join(f"{name}={getattr(self, name)}" for name in self._repr_attributes)


class _ReferenceCell(_SharesParameters):
    _ATTRIBUTES = ("in_channels", "hidden_channels", "kernel_size", "dilation", "padding")

    def __init__(self, cell: nn.Module, attributes, optional_parameters=("bias_ih", "bias_hh")):
        super().__init__(cell, self._ATTRIBUTES + attributes)
        for name in optional_parameters:  # absent (bias=False, no peephole): None, as in the fastvid cell
            if name not in self._parameters:
                setattr(self, name, None)


class ReferenceConvLSTMCell(_ReferenceCell):
    """Plain-PyTorch ``fastvid.nn.ConvLSTMCell``: ``(h, c) = cell(x, (h, c))``; c is fp32 for bf16/fp16."""

    def __init__(self, cell: ConvLSTMCell):
        super().__init__(cell, ("unit_forget_bias", "norm"), ("bias_ih", "bias_hh", "peephole"))

    def forward(self, x: Tensor, state=None):
        if x.dim() == 3:  # unbatched [C_in, H, W], as the fastvid cell takes it
            h, c = self.forward(x.unsqueeze(0), None if state is None else tuple(s.unsqueeze(0) for s in state))
            return h.squeeze(0), c.squeeze(0)
        if state is None:
            B, _, H, W = x.shape
            state = (x.new_zeros(B, self.hidden_channels, H, W),
                     x.new_zeros(B, self.hidden_channels, H, W, dtype=ref.compute_dtype(x.dtype)))
        h, c = state
        if self.norm == "layer":
            conv = functools.partial(F.conv2d, padding=self.padding, dilation=self.dilation)
            bias = None if self.bias_ih is None else self.bias_ih + self.bias_hh
            return ref_norm.ln_lstm_cell(conv(x, self.weight_ih), conv(h, self.weight_hh), c, bias, self.ln_gain_ih,
                                         self.ln_gain_hh, self.ln_gain_c, self.ln_bias_c)
        gates = (F.conv2d(x, self.weight_ih, self.bias_ih, padding=self.padding, dilation=self.dilation)
                 + F.conv2d(h, self.weight_hh, self.bias_hh, padding=self.padding, dilation=self.dilation))
        h, c, _ = ref.lstm_cell(gates, c, self.peephole)
        return h, c


class ReferenceConvGRUCell(_ReferenceCell):
    """Plain-PyTorch ``fastvid.nn.ConvGRUCell``: ``h = cell(x, h)`` (both reset_after formulas)."""

    def __init__(self, cell: ConvGRUCell):
        super().__init__(cell, ("reset_after", "norm"))

    def forward(self, x: Tensor, h=None):
        if x.dim() == 3:  # unbatched [C_in, H, W], as the fastvid cell takes it
            return self.forward(x.unsqueeze(0), None if h is None else h.unsqueeze(0)).squeeze(0)
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden_channels, *x.shape[2:])
        h, = _autocast(h)  # as fastvid.ops.gru_cell and gru_reset_hidden take it: h in the autocast dtype too
        C, conv = self.hidden_channels, functools.partial(F.conv2d, padding=self.padding, dilation=self.dilation)
        if self.norm == "layer":
            return ref_norm.ln_gru_cell(conv(x, self.weight_ih), conv(h, self.weight_hh), h, self.bias_ih,
                                        self.bias_hh, self.ln_gain_ih, self.ln_gain_hh)
        x_gates = conv(x, self.weight_ih, self.bias_ih)
        if self.reset_after:
            h_gates = conv(h, self.weight_hh, self.bias_hh)
        else:  # n = tanh(W*x + U*(r ⊙ h)): the candidate's hidden conv needs r first
            b_rz = None if self.bias_hh is None else self.bias_hh[:2 * C]
            b_n = None if self.bias_hh is None else self.bias_hh[2 * C:]
            h_rz = conv(h, self.weight_hh[:2 * C], b_rz)
            reset_h = ref.gru_reset_hidden(x_gates[:, :C], h_rz[:, :C], h)
            h_gates = torch.cat([h_rz, conv(reset_h, self.weight_hh[2 * C:], b_n)], dim=1)
        return ref.gru_cell(x_gates, h_gates, h, self.reset_after)[0]


class _ReferenceConvRNN(_SharesParameters):
    """Multi-layer, optionally bidirectional time loop shared by the ConvLSTM / ConvGRU twins; each
    direction of each layer runs ``fastvid.reference.recurrent``'s sequence loop."""
    _ATTRIBUTES = ("in_channels", "hidden_channels", "kernel_size", "dilation", "num_layers", "bias", "batch_first",
                   "bidirectional", "dropout", "num_directions")

    def _suffixes(self, layer):
        return [f"_l{layer}"] + ([f"_l{layer}_reverse"] if self.bidirectional else [])

    def _padding(self, layer):
        return tuple(d * (k - 1) // 2 for d, k in zip(self.dilation[layer], self.kernel_size[layer]))

    def _layer_input(self, x, below, layer):
        if layer == 0:
            return x
        if self.dropout > 0 and self.training:
            below = F.dropout(below, self.dropout, training=True)
        return below

    def _initial(self, states, index, x, C, dtype=None):
        """Initial state ``index`` from a [L*D, B, C, H, W] tensor or a per-layer list; zeros if None."""
        if states is None:
            B, _, _, H, W = x.shape
            return x.new_zeros(B, C, H, W, dtype=dtype)
        return states[index]

    def _run(self, x, run_direction):
        if x.dim() != 5 or x.shape[2] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: input must be 5-D with {self.in_channels} channels at "
                             f"dim 2, got {tuple(x.shape)}")
        x = x if self.batch_first else x.transpose(0, 1)
        below, finals = None, []
        for layer in range(self.num_layers):
            inp = self._layer_input(x, below, layer)
            directions = []
            for d, suffix in enumerate(self._suffixes(layer)):
                out, *states = run_direction(inp, x, layer, d, suffix, layer * self.num_directions + d)
                directions.append(out)
                finals.append(states)
            below = directions[0] if len(directions) == 1 else torch.cat(directions, 2)
        output = below if self.batch_first else below.transpose(0, 1)
        return output, [_stack_or_list(list(kind)) for kind in zip(*finals)]

    stream = _ConvRNNBase.stream  # the same chunk-by-chunk contract as the fastvid layer's

    def _checked_lengths(self, name, lengths, x):
        """``lengths`` checked once per call as the fastvid ops check it (against the batch-first clip)."""
        if lengths is None or x.dim() != 5:  # no lengths, or _run names the bad input
            return lengths
        return _check_lengths(name, lengths, x if self.batch_first else x.transpose(0, 1))


class ReferenceConvLSTM(_ReferenceConvRNN):
    """Plain-PyTorch ``fastvid.nn.ConvLSTM``: ``output, (h_n, c_n) = m(x, (h_0, c_0))``."""

    def __init__(self, module: ConvLSTM):
        super().__init__(module, self._ATTRIBUTES + ("peephole", "unit_forget_bias", "norm"))

    def forward(self, x: Tensor, state=None, lengths=None):
        steps = self._checked_lengths("convlstm", lengths, x)

        def run_direction(inp, x, layer, d, suffix, index):
            C = self.hidden_channels[layer]
            h0 = self._initial(None if state is None else state[0], index, x, C)
            c0 = self._initial(None if state is None else state[1], index, x, C, ref.compute_dtype(x.dtype))
            w_ih, w_hh = getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix)
            bias = getattr(self, "bias_ih" + suffix) + getattr(self, "bias_hh" + suffix) if self.bias else None
            peephole = getattr(self, "peephole" + suffix) if self.peephole else None
            inp, w_ih, w_hh, bias, h0 = _autocast(inp, w_ih, w_hh, bias, h0)
            if self.norm == "layer":
                _no_lengths_with_norm(lengths)
                norm = [getattr(self, name + suffix) for name in ("ln_gain_ih", "ln_gain_hh", "ln_gain_c", "ln_bias_c")]
                return ref_norm.convlstm_ln_sequence(inp, w_ih, w_hh, bias, h0, c0, *norm, self._padding(layer),
                                                     self.dilation[layer], reverse=d == 1)
            return ref.convlstm_sequence(inp, w_ih, w_hh, bias, h0, c0, peephole, self._padding(layer),
                                         self.dilation[layer], reverse=d == 1, lengths=steps)

        output, (h_n, c_n) = self._run(x, run_direction)
        return output, (h_n, c_n)


class ReferenceConvGRU(_ReferenceConvRNN):
    """Plain-PyTorch ``fastvid.nn.ConvGRU``: ``output, h_n = m(x, h_0)``."""

    def __init__(self, module: ConvGRU):
        super().__init__(module, self._ATTRIBUTES + ("reset_after", "input_to_all_layers", "norm"))

    def _layer_input(self, x, below, layer):
        inp = super()._layer_input(x, below, layer)
        return torch.cat([x, inp], 2) if (layer > 0 and self.input_to_all_layers) else inp

    def forward(self, x: Tensor, h_0=None, lengths=None):
        steps = self._checked_lengths("convgru", lengths, x)

        def run_direction(inp, x, layer, d, suffix, index):
            h0 = self._initial(h_0, index, x, self.hidden_channels[layer])
            params = _autocast(inp, *(getattr(self, name + suffix, None)
                                      for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")), h0)
            inp, w_ih, w_hh, b_ih, b_hh, h0 = params
            if self.norm == "layer":
                _no_lengths_with_norm(lengths)
                gains = [getattr(self, name + suffix) for name in ("ln_gain_ih", "ln_gain_hh")]
                return ref_norm.convgru_ln_sequence(inp, w_ih, w_hh, b_ih, b_hh, h0, *gains, self._padding(layer),
                                                    self.dilation[layer], reverse=d == 1)
            return ref.convgru_sequence(inp, w_ih, w_hh, b_ih, b_hh, h0, self._padding(layer), self.dilation[layer],
                                        reset_after=self.reset_after, reverse=d == 1, lengths=steps)

        output, (h_n,) = self._run(x, run_direction)
        return output, h_n


def _stack_or_list(states):
    """[num_layers*num_directions, B, C, H, W], or the list itself when layer widths differ (as fastvid)."""
    if all(s.shape == states[0].shape for s in states):
        return torch.stack(states)
    return states


class ReferenceAttentionConvLSTM(nn.Module):
    """Plain-PyTorch ``fastvid.nn.AttentionConvLSTM``: the same attention convs (``nn.Conv2d`` modules)
    and cell parameters, the time loop of ``fastvid.reference.attention_lstm``."""

    def __init__(self, module: AttentionConvLSTM):
        super().__init__()
        for name in ("in_channels", "hidden_channels", "attention_channels", "attention_in_channels", "batch_first"):
            setattr(self, name, getattr(module, name))
        self.input_attention = module.input_attention
        self.hidden_attention = module.hidden_attention
        self.attention_score = module.attention_score
        self.cell = ReferenceConvLSTMCell(module.cell)
        self.train(module.training)

    def forward(self, x: Tensor, attention_input=None, state=None):
        if x.dim() != 5 or x.shape[2] != self.in_channels:
            raise ValueError(f"ReferenceAttentionConvLSTM: x must be 5-D with {self.in_channels} channels at dim 2, "
                             f"got {tuple(x.shape)}")
        if not self.batch_first:
            x = x.transpose(0, 1)
            attention_input = None if attention_input is None else attention_input.transpose(0, 1)
        h0, c0 = state if state is not None else (None, None)
        cell = self.cell
        output, (h, c), maps = attention_convlstm(
            x, attention_input, self.input_attention.weight, self.input_attention.bias, self.hidden_attention.weight,
            self.attention_score.weight, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, cell.peephole,
            h0, c0)
        if not self.batch_first:
            output, maps = output.transpose(0, 1), maps.transpose(0, 1)
        return output, (h, c), maps


class ReferenceNonLocalBlock(nn.Module):
    """Plain-PyTorch twin of :class:`fastvid.nn.NonLocalBlock`, sharing its submodules (same names:
    theta, phi, g, out, concat_project, pool, norm): the N×M affinity matrix is materialised, the way
    the block is usually written."""

    def __init__(self, block: NonLocalBlock):
        super().__init__()
        for name in ("theta", "phi", "g", "out", "concat_project", "pool", "norm"):
            setattr(self, name, getattr(block, name))
        self.mode, self.scale, self.inter_channels = block.mode, block.scale, block.inter_channels
        self.pool_before_projection = block.pool_before_projection
        self.train(block.training)

    def forward(self, x: Tensor) -> Tensor:
        pool = self.pool if self.pool is not None else nn.Identity()
        keys_in = pool(x) if self.pool_before_projection else x
        theta = self.theta(x) if self.theta is not None else x
        phi = self.phi(keys_in) if self.phi is not None else keys_in
        g = self.g(keys_in)
        if not self.pool_before_projection:
            phi, g = pool(phi), pool(g)
        theta, phi, g = theta.flatten(2), phi.flatten(2), g.flatten(2)  # [B, C', N], [B, C', M], [B, inter, M]
        M = phi.shape[-1]
        if self.mode in ("embedded_gaussian", "gaussian"):
            affinity = torch.softmax(self.scale * torch.matmul(theta.transpose(1, 2), phi), dim=-1)
        elif self.mode == "dot_product":
            affinity = torch.matmul(theta.transpose(1, 2), phi) / M
        else:
            w = self.concat_project.weight.view(2, self.inter_channels)
            affinity = torch.relu(torch.matmul(w[0], theta)[:, :, None] + torch.matmul(w[1], phi)[:, None, :]) / M
        y = torch.matmul(affinity, g.transpose(1, 2)).transpose(1, 2).reshape(x.shape[0], self.inter_channels, *x.shape[2:])
        z = self.out(y)
        return x + (self.norm(z) if self.norm is not None else z)


def _twin(cls, make):
    """Converter entry: ``make(module)`` for instances of ``cls``, None for anything else."""
    return lambda module: make(module) if isinstance(module, cls) else None


TO_REFERENCE: List = [
    ("depthwise_conv3d", _twin(DepthwiseConv3d, depthwise_to_conv3d)),
    ("convlstm_cell", _twin(ConvLSTMCell, ReferenceConvLSTMCell)),
    ("convgru_cell", _twin(ConvGRUCell, ReferenceConvGRUCell)),
    ("convlstm", _twin(ConvLSTM, ReferenceConvLSTM)),
    ("convgru", _twin(ConvGRU, ReferenceConvGRU)),
    ("attention_convlstm", _twin(AttentionConvLSTM, ReferenceAttentionConvLSTM)),
    ("nonlocal_block", _twin(NonLocalBlock, ReferenceNonLocalBlock)),
]
