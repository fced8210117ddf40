"""ConvLSTM / ConvGRU modules mirroring ``nn.LSTM`` / ``nn.GRU``.

Parameters are named like ``nn.LSTM``: ``weight_ih_l{k}[_reverse]`` ``[G*C, C_in, kH, kW]``,
``weight_hh_l{k}[_reverse]`` ``[G*C, C, kH, kW]``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` ``[G*C]``
(G = 4 for LSTM with gate order i, f, g, o; G = 3 for GRU with r, z, n), so state dicts move
between backends. Inputs are ``[B, T, C, H, W]`` (``batch_first=True``) or ``[T, B, C, H, W]``;
'same' padding keeps H×W.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import ops
from .._sizes import pair
from ..ops.recurrent import _channels_last  # the sequence ops' own test of the frame layout
from ._build import module_to_fill
from ._fx import fx_leaf

IntOrPair = Union[int, Sequence[int]]


def _per_layer(value, num_layers, name):
    """An int/tuple for every layer, or a list with one entry per layer."""
    if isinstance(value, list):
        if len(value) != num_layers:
            raise ValueError(f"{name} has {len(value)} entries but num_layers = {num_layers}")
        return value
    return [value] * num_layers


def _check_kernel(kernel_size):
    if len(kernel_size) != 2:
        raise ValueError(f"kernel_size must be one int or an (H, W) pair, got {kernel_size}")
    if any(k % 2 == 0 or k < 1 for k in kernel_size):
        raise ValueError(f"kernel_size must be odd (the state keeps its H x W with 'same' padding), got {kernel_size}")


def _check_norm(norm, peephole=False, strategy=None, reset_after=True):
    """norm=None or "layer" (fastvid/reference/recurrent_norm.py), and what it cannot combine with."""
    if norm not in (None, "layer"):
        raise ValueError(f"norm must be None or 'layer', got {norm!r}")
    if norm is None:
        return
    if peephole:
        raise ValueError("norm='layer' does not support peephole=True")
    if strategy not in (None, "auto", "hoisted"):
        raise ValueError(f"norm='layer' runs the hoisted strategy only (the norms need the input and hidden convs "
                         f"apart), got strategy={strategy!r}")
    if not reset_after:
        raise ValueError("norm='layer' needs reset_after=True for ConvGRU (the hidden norm runs over W_hh*h)")


def _norm_parameters(module, suffix, num_gates, C):
    """The layer-norm gains (init 1) and, for the LSTM cell state, biases (init 0) of one cell."""
    module.register_parameter("ln_gain_ih" + suffix, nn.Parameter(torch.ones(num_gates * C)))
    module.register_parameter("ln_gain_hh" + suffix, nn.Parameter(torch.ones(num_gates * C)))
    if num_gates == 4:
        module.register_parameter("ln_gain_c" + suffix, nn.Parameter(torch.ones(C)))
        module.register_parameter("ln_bias_c" + suffix, nn.Parameter(torch.zeros(C)))


def _reset_norm(module, suffix):
    for name in ("ln_gain_ih", "ln_gain_hh", "ln_gain_c", "ln_bias_c"):
        p = getattr(module, name + suffix, None)
        if p is not None:
            (nn.init.zeros_ if name == "ln_bias_c" else nn.init.ones_)(p)


def _norm_args(module, suffix, num_gates):
    names = ("ln_gain_ih", "ln_gain_hh") + (("ln_gain_c", "ln_bias_c") if num_gates == 4 else ())
    return [getattr(module, name + suffix) for name in names]


def _check_dilation(dilation):
    if len(dilation) != 2 or any(d < 1 for d in dilation):
        raise ValueError(f"dilation must be one int or an (H, W) pair, each >= 1, got {dilation}")


class _ConvRNNCellBase(nn.Module):
    num_gates = 4

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: IntOrPair = 3, bias: bool = True,
                 dilation: IntOrPair = 1):
        super().__init__()
        if in_channels <= 0 or hidden_channels <= 0:
            raise ValueError(f"in_channels and hidden_channels must be positive, got {in_channels}, {hidden_channels}")
        self.in_channels, self.hidden_channels = in_channels, hidden_channels
        self.kernel_size, self.dilation = pair(kernel_size), pair(dilation)
        _check_kernel(self.kernel_size)
        _check_dilation(self.dilation)
        self.padding = tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))
        G, C = self.num_gates, hidden_channels
        self.weight_ih = nn.Parameter(torch.empty(G * C, in_channels, *self.kernel_size))
        self.weight_hh = nn.Parameter(torch.empty(G * C, C, *self.kernel_size))
        self.bias_ih = nn.Parameter(torch.empty(G * C)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(G * C)) if bias else None

    def extra_repr(self):
        norm = f", norm={self.norm!r}" if getattr(self, "norm", None) else ""
        return (f"{self.in_channels}, {self.hidden_channels}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, bias={self.bias_ih is not None}{norm}")

    def _conv(self, x, weight, bias):
        return torch.nn.functional.conv2d(x, weight, bias, padding=self.padding, dilation=self.dilation)

    def _zeros(self, x, dtype=None):
        B, _, H, W = x.shape
        return x.new_zeros(B, self.hidden_channels, H, W, dtype=dtype)

    def _check_step(self, x: Tensor, broadcast_h: bool = False, **states) -> None:
        """One time step's input [B, C_in, H, W] and states [B, C, H, W] (None: zeros), or unbatched ones
        ([C_in, H, W] and [C, H, W], as nn.LSTMCell and nn.Conv2d take one sample), or a clear error.
        broadcast_h: a batched h may have batch 1 (ConvLSTMCell: its hidden conv's output broadcasts, as a
        learned initial state relies on). Not while tracing: the checks would be Python booleans of traced sizes."""
        if torch.jit.is_tracing():
            return
        name = type(self).__name__
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"{name}: input must be one time step [B, {self.in_channels}, H, W] (or unbatched "
                             f"[{self.in_channels}, H, W]), got {tuple(x.shape)}"
                             + (" (a whole clip goes to the sequence layer)" if x.dim() == 5 else ""))
        unbatched = x.dim() == 3
        expected = (*x.shape[:-3], self.hidden_channels, *x.shape[-2:])
        for state_name, state in states.items():
            if state is None or tuple(state.shape) == expected:
                continue
            if not (broadcast_h and not unbatched and state_name == "h" and tuple(state.shape) == (1, *expected[1:])):
                raise ValueError(f"{name}: {state_name} must be {'[C, H, W]' if unbatched else '[B, C, H, W]'} = "
                                 f"{expected}{' for an unbatched input' if unbatched else ''}, got {tuple(state.shape)}")


class ConvLSTMCell(_ConvRNNCellBase):
    """One ConvLSTM step (Shi et al. 2015): ``(h, c) = cell(x, (h, c))`` on ``[B, C, H, W]`` maps.

    The cell state is kept in fp32 for bf16/fp16 inputs. ``peephole=True`` adds per-channel
    peephole weights ``[3, C]`` (w_ci, w_cf, w_co). ``norm="layer"``: the layer-normalised cell of
    Ba et al. 2016 (LN of the input and hidden pre-activations per sample over 4C x H x W, LN of c
    over C x H x W before the tanh; gains ``ln_gain_ih``, ``ln_gain_hh`` ``[4C]``, ``ln_gain_c``
    ``[C]`` init 1, ``ln_bias_c`` ``[C]`` init 0; equations in fastvid/reference/recurrent_norm.py)."""
    num_gates = 4

    def __init__(self, in_channels, hidden_channels, kernel_size=3, bias=True, dilation=1, peephole=False,
                 unit_forget_bias=True, norm=None):
        super().__init__(in_channels, hidden_channels, kernel_size, bias, dilation)
        _check_norm(norm, peephole)
        self.norm = norm
        self.peephole = nn.Parameter(torch.zeros(3, hidden_channels)) if peephole else None
        if norm == "layer":
            _norm_parameters(self, "", 4, hidden_channels)
        self.unit_forget_bias = unit_forget_bias
        self.reset_parameters()

    def reset_parameters(self):
        _init_recurrent(self.hidden_channels, [self.weight_ih, self.weight_hh], [self.bias_ih, self.bias_hh],
                        self.unit_forget_bias)
        if self.peephole is not None:
            nn.init.zeros_(self.peephole)
        _reset_norm(self, "")

    def forward(self, x: Tensor, state: Optional[tuple] = None):
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: one leaf node (nn/_fx.py)
            return fx_leaf(self, x, state)
        _check_lstm_state(self, state)
        self._check_step(x, broadcast_h=True, h=None if state is None else state[0], c=None if state is None else state[1])
        if x.dim() == 3:  # unbatched
            h, c = self.forward(x.unsqueeze(0), None if state is None else tuple(s.unsqueeze(0) for s in state))
            return h.squeeze(0), c.squeeze(0)
        h, c = state if state is not None else (self._zeros(x), self._zeros(x, ops.recurrent._acc(x.dtype)))
        if self.norm == "layer":  # one step of the fused sequence op
            bias = None if self.bias_ih is None else self.bias_ih + self.bias_hh
            h = h.expand(x.shape[0], -1, -1, -1)  # a batch-1 h broadcasts (_check_step), as in the plain cell
            _, h, c = ops.convlstm_ln(x.unsqueeze(1), self.weight_ih, self.weight_hh, bias, h, c,
                                      *_norm_args(self, "", 4), self.padding, self.dilation)
            return h, c
        gates = self._conv(x, self.weight_ih, self.bias_ih) + self._conv(h, self.weight_hh, self.bias_hh)
        return ops.lstm_cell(gates, c, self.peephole)

    @classmethod
    def from_concat_conv(cls, conv: nn.Conv2d, hidden_channels: int, gate_order: str = "ifgo",
                         peephole: bool = False) -> "ConvLSTMCell":
        """A cell equal to the common hand-written step ``conv(cat([x, h], 1))`` → split into 4
        gates in ``gate_order`` (a permutation of "ifgo", e.g. "ifog") → sigmoid/tanh; the conv's
        weights are split into weight_ih / weight_hh and its bias becomes bias_ih (bias_hh = 0)."""
        if sorted(gate_order) != sorted("ifgo"):
            raise ValueError(f"gate_order must be a permutation of 'ifgo', got {gate_order!r}")
        C = hidden_channels
        if conv.out_channels != 4 * C or conv.in_channels <= C:
            raise ValueError(f"conv must map C_in + {C} channels to {4 * C}, got {conv.in_channels} -> "
                             f"{conv.out_channels}")
        if conv.groups != 1 or pair(conv.stride) != (1, 1):
            raise ValueError("conv must have groups=1 and stride=1")
        dilation = pair(conv.dilation)
        kernel = pair(conv.kernel_size)
        expected = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv must zero-pad (the cell's convolutions do), got padding_mode={conv.padding_mode!r}")
        if conv.padding == "same":  # symmetric where d·(k - 1) is even: that is the cell's padding
            same = all(d * (k - 1) % 2 == 0 for d, k in zip(dilation, kernel))
            padding = expected if same else None
        else:
            padding = (0, 0) if conv.padding == "valid" else pair(conv.padding)
        if padding != expected:
            raise ValueError(f"conv padding {conv.padding!r} is not the cell's 'same' padding {expected} (d·(k - 1) / 2 "
                             f"on each side, for kernel {kernel} and dilation {dilation})")
        cell = module_to_fill(cls, ConvLSTMCell, conv.in_channels - C, C, kernel, bias=conv.bias is not None,
                              dilation=dilation, peephole=peephole)  # peepholes: zero, as built
        order = [gate_order.index(g) for g in "ifgo"]  # position of i, f, g, o in the conv's output
        weight = torch.cat([conv.weight.detach()[k * C:(k + 1) * C] for k in order])
        with torch.no_grad():
            cell.weight_ih.copy_(weight[:, :-C])
            cell.weight_hh.copy_(weight[:, -C:])
            if conv.bias is not None:
                cell.bias_ih.copy_(torch.cat([conv.bias.detach()[k * C:(k + 1) * C] for k in order]))
                cell.bias_hh.zero_()
        return cell.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @classmethod
    def from_keras_weights(cls, kernel, recurrent_kernel, bias=None, **config) -> "ConvLSTMCell":
        """A cell with a Keras ``ConvLSTM2D`` layer's weights (``kernel`` [kH, kW, C_in, 4C],
        ``recurrent_kernel`` [kH, kW, C, 4C], ``bias`` [4C]; gate order i, f, c, o). ``config``: the
        layer's ``padding``, ``strides``, ``dilation_rate``, ``activation``, ``recurrent_activation``,
        ``unit_forget_bias``; what converts is in fastvid/nn/keras_interop.py."""
        from .keras_interop import cell_from_keras
        return cell_from_keras(cls, kernel, recurrent_kernel, bias, **config)


class ConvGRUCell(_ConvRNNCellBase):
    """One ConvGRU step: ``h = cell(x, h)``. ``reset_after=True`` is the ``nn.GRU`` formula
    n = tanh(W_in*x + b_in + r ⊙ (W_hn*h + b_hn)); ``reset_after=False`` is Ballas et al. 2016,
    n = tanh(W*x + U*(r ⊙ h)). Both use h = (1 - z) ⊙ n + z ⊙ h_prev. ``norm="layer"`` (reset_after
    only): LN of the input and hidden pre-activations, each per sample over 3C x H x W, with gains
    ``ln_gain_ih``, ``ln_gain_hh`` ``[3C]`` (init 1) and bias_ih / bias_hh added after the norms
    (fastvid/reference/recurrent_norm.py)."""
    num_gates = 3

    def __init__(self, in_channels, hidden_channels, kernel_size=3, bias=True, dilation=1, reset_after=True,
                 norm=None):
        super().__init__(in_channels, hidden_channels, kernel_size, bias, dilation)
        _check_norm(norm, reset_after=reset_after)
        self.reset_after, self.norm = reset_after, norm
        if norm == "layer":
            _norm_parameters(self, "", 3, hidden_channels)
        self.reset_parameters()

    def reset_parameters(self):
        _init_recurrent(self.hidden_channels, [self.weight_ih, self.weight_hh], [self.bias_ih, self.bias_hh], False)
        _reset_norm(self, "")

    def forward(self, x: Tensor, h: Optional[Tensor] = None) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: one leaf node (nn/_fx.py)
            return fx_leaf(self, x, h)
        self._check_step(x, h=h)
        if x.dim() == 3:  # unbatched
            return self.forward(x.unsqueeze(0), None if h is None else h.unsqueeze(0)).squeeze(0)
        h = self._zeros(x) if h is None else h
        if self.norm == "layer":  # one step of the fused sequence op
            return ops.convgru_ln(x.unsqueeze(1), self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, h,
                                  *_norm_args(self, "", 3), self.padding, self.dilation)[1]
        C = self.hidden_channels
        x_gates = self._conv(x, self.weight_ih, self.bias_ih)
        if self.reset_after:
            h_gates = self._conv(h, self.weight_hh, self.bias_hh)
        else:
            b_rz = None if self.bias_hh is None else self.bias_hh[:2 * C]
            b_n = None if self.bias_hh is None else self.bias_hh[2 * C:]
            h_rz = self._conv(h, self.weight_hh[:2 * C], b_rz)
            reset_h = ops.gru_reset_hidden(x_gates[:, :C], h_rz[:, :C], h)
            h_gates = torch.cat([h_rz, self._conv(reset_h, self.weight_hh[2 * C:], b_n)], dim=1)
        return ops.gru_cell(x_gates, h_gates, h, self.reset_after)


def _init_recurrent(C, weights, biases, unit_forget_bias):
    """U(-1/√fan, 1/√fan) as nn.LSTM (fan = C·kH·kW); forget-gate bias 1 when unit_forget_bias."""
    bound = 1.0 / math.sqrt(C * weights[1].shape[2] * weights[1].shape[3])
    for w in weights:
        nn.init.uniform_(w, -bound, bound)
    for b in biases:
        if b is not None:
            nn.init.uniform_(b, -bound, bound)
    if unit_forget_bias and biases[0] is not None:
        with torch.no_grad():  # the summed forget bias b_ih + b_hh starts at 1
            biases[0][C:2 * C].fill_(1.0)
            biases[1][C:2 * C].fill_(0.0)


def _cat_channels(outputs):
    """The directions' outputs [B, T, C, H, W] concatenated along C, in their frame layout: torch.cat
    returns channels-last frames (channels innermost) contiguous, so a bidirectional layer's output
    left the layout its input and each direction's output have."""
    if _channels_last(outputs[0]):
        return torch.cat([o.permute(0, 1, 3, 4, 2) for o in outputs], -1).permute(0, 1, 4, 2, 3)
    return torch.cat(outputs, 2)


class _ConvRNNBase(nn.Module):
    num_gates = 4

    def __init__(self, in_channels: int, hidden_channels, kernel_size=3, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = True, bidirectional: bool = False, dropout: float = 0.0, dilation=1,
                 strategy: Optional[str] = None):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if dropout > 0 and num_layers == 1:  # nn.LSTM's warning
            warnings.warn(f"dropout applies between layers, so non-zero dropout expects num_layers > 1, got "
                          f"dropout={dropout} and num_layers=1", UserWarning, stacklevel=3)
        if in_channels <= 0:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        self.in_channels, self.num_layers = in_channels, num_layers
        self.hidden_channels = _per_layer(hidden_channels, num_layers, "hidden_channels")
        if any(not isinstance(c, int) or c <= 0 for c in self.hidden_channels):
            raise ValueError(f"hidden_channels must be a positive int per layer, got {hidden_channels}")
        self.kernel_size = [pair(k) for k in _per_layer(kernel_size, num_layers, "kernel_size")]
        self.dilation = [pair(d) for d in _per_layer(dilation, num_layers, "dilation")]
        for k in self.kernel_size:
            _check_kernel(k)
        for d in self.dilation:
            _check_dilation(d)
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.dropout, self.strategy = dropout, strategy
        self.num_directions = 2 if bidirectional else 1
        G = self.num_gates
        for layer in range(num_layers):
            C = self.hidden_channels[layer]
            for suffix in self._suffixes(layer):
                c_in = self._layer_input_channels(layer)
                self.register_parameter("weight_ih" + suffix, nn.Parameter(torch.empty(G * C, c_in, *self.kernel_size[layer])))
                self.register_parameter("weight_hh" + suffix, nn.Parameter(torch.empty(G * C, C, *self.kernel_size[layer])))
                if bias:
                    self.register_parameter("bias_ih" + suffix, nn.Parameter(torch.empty(G * C)))
                    self.register_parameter("bias_hh" + suffix, nn.Parameter(torch.empty(G * C)))

    def _suffixes(self, layer):
        return [f"_l{layer}"] + ([f"_l{layer}_reverse"] if self.bidirectional else [])

    def _layer_input_channels(self, layer):
        return self.in_channels if layer == 0 else self.hidden_channels[layer - 1] * self.num_directions

    def _params(self, suffix):
        get = lambda name: getattr(self, name + suffix, None)  # noqa: E731
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")

    def extra_repr(self):
        return (f"{self.in_channels}, {self.hidden_channels}, kernel_size={self.kernel_size}, "
                f"num_layers={self.num_layers}, bidirectional={self.bidirectional}, batch_first={self.batch_first}")

    def _check_input(self, x):
        if x.dim() != 5:
            raise ValueError(f"{type(self).__name__}: input must be 5-D "
                             f"{'[B, T, C, H, W]' if self.batch_first else '[T, B, C, H, W]'}, got {tuple(x.shape)}")
        if x.shape[2] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[2]} channels, expected "
                             f"in_channels = {self.in_channels}")
        if x.shape[1 if self.batch_first else 0] == 0:  # (an empty batch runs, as in nn.LSTM)
            raise ValueError(f"{type(self).__name__}: input has an empty time dimension (shape {tuple(x.shape)})")
        return x if self.batch_first else x.transpose(0, 1)

    def _check_state(self, name, state, x, layer_state_shape):
        expected = (self.num_layers * self.num_directions, x.shape[0], *layer_state_shape)
        if state.dim() != 5 or any(state.shape[i] != expected[i] for i in (0, 1, 3, 4)):
            raise ValueError(f"{type(self).__name__}: {name} must be [num_layers * num_directions, B, C, H, W] "
                             f"= {expected[:2]} + [C, {x.shape[3]}, {x.shape[4]}], got {tuple(state.shape)}")
        return state

    def _layer_inputs(self, x, outputs, layer):
        inp = x if layer == 0 else outputs
        if layer > 0 and self.dropout > 0 and self.training:
            inp = torch.nn.functional.dropout(inp, self.dropout, training=True)
        return inp

    def padding_of(self, layer):
        return tuple(d * (k - 1) // 2 for d, k in zip(self.dilation[layer], self.kernel_size[layer]))

    def _state_at(self, state, name, index, x, C):
        """Initial state `index` from a [L*D, B, C, H, W] tensor or a per-layer list."""
        if not isinstance(state, (list, tuple)):
            self._check_state(name, state, x, (C, x.shape[3], x.shape[4]))
        elif len(state) != self.num_layers * self.num_directions:
            raise ValueError(f"{type(self).__name__}: {name} as a list needs num_layers * num_directions = "
                             f"{self.num_layers * self.num_directions} states, got {len(state)}")
        s = state[index]
        if s.shape != (x.shape[0], C, x.shape[3], x.shape[4]):
            raise ValueError(f"{type(self).__name__}: {name}[{index}] must be [B, C, H, W] = "
                             f"{(x.shape[0], C, x.shape[3], x.shape[4])}, got {tuple(s.shape)}")
        return s

    def _run_layers(self, x, run_direction):
        """Runs every layer and direction: run_direction(inp, x, layer, direction, suffix, index) returns
        (output, *final states). Returns (output, [stacked final states, one per state kind])."""
        x = self._check_input(x)
        finals, outputs = [], None
        for layer in range(self.num_layers):
            inp = self._layer_inputs(x, outputs, layer)
            direction_outputs = []
            for d, suffix in enumerate(self._suffixes(layer)):
                out, *states = run_direction(inp, x, layer, d, suffix, layer * self.num_directions + d)
                direction_outputs.append(out)
                finals.append(states)
            outputs = direction_outputs[0] if len(direction_outputs) == 1 else _cat_channels(direction_outputs)
        output = outputs if self.batch_first else outputs.transpose(0, 1)
        return output, [_stack_states(list(kind)) for kind in zip(*finals)]

    def stream(self, chunk: Tensor, state=None):
        """The next ``chunk`` of frames of a longer sequence, continuing from ``state`` (what the
        previous call returned; None at the start). Chunk by chunk, down to one frame at a time, the
        outputs and the final state equal one call on the whole sequence, and gradients flow through
        the carried state (detach it to cut them). Unlike ``forward``, which accepts any initial state,
        this rejects bidirectional modules: their reverse direction starts at the last frame."""
        if self.bidirectional:
            raise ValueError(f"{type(self).__name__}.stream: a bidirectional module cannot run chunk by chunk: its "
                             f"reverse direction starts at the last frame of the sequence, which has not arrived yet "
                             f"(call it once on the whole sequence, or use bidirectional=False)")
        return self(chunk, state)


def _check_lstm_state(owner: nn.Module, state, names=("h", "c")) -> None:
    """An LSTM state is None or the pair (h, c), neither None (a 1-tuple or a None in it failed with an
    IndexError or an AttributeError from inside the layer)."""
    if state is None:
        return
    if not isinstance(state, (tuple, list)) or len(state) != 2 or any(s is None for s in state):
        if not isinstance(state, (tuple, list)):
            got = type(state).__name__
        elif len(state) == 2:
            got = f"({', '.join('None' if s is None else type(s).__name__ for s in state)})"
        else:
            got = f"a {type(state).__name__} of {len(state)}"
        raise ValueError(f"{type(owner).__name__}: the state must be None or the pair ({names[0]}, {names[1]}), "
                         f"got {got}")


def _no_lengths_with_norm(lengths):
    if lengths is not None:
        raise ValueError("lengths= is not supported with norm='layer' yet (the layer-norm kernels take no step mask)")


class ConvLSTM(_ConvRNNBase):
    """Multi-layer ConvLSTM over ``[B, T, C_in, H, W]`` (``batch_first``), like ``nn.LSTM``.

    ``output, (h_n, c_n) = m(x, (h_0, c_0))`` with ``output`` ``[B, T, num_directions*C_last, H, W]``
    and states ``[num_layers*num_directions, B, C, H, W]`` (layers of different widths: a list of
    per-layer states is returned instead). Each layer runs the fused sequence op (time loop in
    C++; see fastvid.ops.convlstm). ``strategy``: None (auto), 'hoisted', 'concat' or 'winograd'.

    ``m(x, state, lengths=lengths)`` with ``lengths`` ``[B]`` (integers in 1..T, CPU or x's device) runs a
    zero-padded batch of shorter clips as ``nn.LSTM`` runs a ``pack_padded_sequence``: ``output`` is 0
    past each clip's length and ``h_n``/``c_n`` are each clip's state at its last frame (every layer and
    direction; the reverse direction starts at each clip's last frame). Keep ``lengths`` on the CPU:
    on a GPU, checking its values costs a device sync per layer and direction.

    ``norm="layer"``: layer-normalised cells as in ``ConvLSTMCell`` (parameters ``ln_gain_ih_l{k}``,
    ``ln_gain_hh_l{k}``, ``ln_gain_c_l{k}``, ``ln_bias_c_l{k}`` [+ ``_reverse``]; see fastvid.ops.convlstm_ln)."""
    num_gates = 4

    def __init__(self, in_channels, hidden_channels, kernel_size=3, num_layers=1, bias=True, batch_first=True,
                 bidirectional=False, dropout=0.0, dilation=1, peephole=False, unit_forget_bias=True,
                 strategy=None, norm=None):
        _check_norm(norm, peephole, strategy)
        super().__init__(in_channels, hidden_channels, kernel_size, num_layers, bias, batch_first, bidirectional,
                         dropout, dilation, strategy)
        self.peephole, self.unit_forget_bias, self.norm = peephole, unit_forget_bias, norm
        if norm == "layer":
            for layer in range(num_layers):
                for suffix in self._suffixes(layer):
                    _norm_parameters(self, suffix, 4, self.hidden_channels[layer])
        if peephole:
            for layer in range(num_layers):
                for suffix in self._suffixes(layer):
                    self.register_parameter("peephole" + suffix,
                                            nn.Parameter(torch.zeros(3, self.hidden_channels[layer])))
        self.reset_parameters()

    def reset_parameters(self):
        for layer in range(self.num_layers):
            for suffix in self._suffixes(layer):
                w_ih, w_hh, b_ih, b_hh = self._params(suffix)
                _init_recurrent(self.hidden_channels[layer], [w_ih, w_hh], [b_ih, b_hh], self.unit_forget_bias)
                if self.peephole:
                    nn.init.zeros_(getattr(self, "peephole" + suffix))
                _reset_norm(self, suffix)

    def forward(self, x: Tensor, state: Optional[tuple] = None, lengths: Optional[Tensor] = None):
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: one leaf node (nn/_fx.py)
            return fx_leaf(self, x, state, lengths)
        _check_lstm_state(self, state, ("h_0", "c_0"))

        def run_direction(inp, x, layer, d, suffix, index):
            C = self.hidden_channels[layer]
            h0 = None if state is None else self._state_at(state[0], "h_0", index, x, C)
            c0 = None if state is None else self._state_at(state[1], "c_0", index, x, C)
            w_ih, w_hh, b_ih, b_hh = self._params(suffix)
            bias = None if b_ih is None else b_ih + b_hh
            if self.norm == "layer":
                _no_lengths_with_norm(lengths)
                return ops.convlstm_ln(inp, w_ih, w_hh, bias, h0, c0, *_norm_args(self, suffix, 4),
                                       self.padding_of(layer), self.dilation[layer], reverse=d == 1)
            peephole = getattr(self, "peephole" + suffix) if self.peephole else None
            return ops.convlstm(inp, w_ih, w_hh, bias, h0, c0, peephole, self.padding_of(layer), self.dilation[layer],
                                reverse=d == 1, strategy=self.strategy, lengths=lengths)

        output, (h_n, c_n) = self._run_layers(x, run_direction)
        return output, (h_n, c_n)

    @classmethod
    def from_keras_weights(cls, layers, **config) -> "ConvLSTM":
        """A ConvLSTM with the weights of stacked Keras ``ConvLSTM2D`` layers: ``layers`` is one
        ``layer.get_weights()`` list per layer (bottom first), or one layer's list. ``config``: the
        layers' ``padding``, ``strides``, ``dilation_rate``, ``activation``, ``recurrent_activation``,
        ``unit_forget_bias``, and ``batch_first``, ``strategy``; see fastvid/nn/keras_interop.py."""
        from .keras_interop import sequence_from_keras
        return sequence_from_keras(cls, layers, **config)


class ConvGRU(_ConvRNNBase):
    """Multi-layer ConvGRU over ``[B, T, C_in, H, W]``, like ``nn.GRU``: ``output, h_n = m(x, h_0)``.

    ``reset_after``: True = ``nn.GRU`` formula, False = Ballas et al. 2016.
    ``input_to_all_layers=True``: the stacked ConvGRU of Ballas et al. in which layer l > 0 receives
    both the input x and the lower layer's hidden state (channels concatenated, so
    ``weight_ih_l{l}`` is ``[3C, C_in + C_{l-1}·num_directions, kH, kW]``).
    ``m(x, h_0, lengths=lengths)``: variable-length clips, as in ConvLSTM.

    ``norm="layer"``: layer-normalised cells as in ``ConvGRUCell`` (parameters ``ln_gain_ih_l{k}``,
    ``ln_gain_hh_l{k}`` [+ ``_reverse``]; see fastvid.ops.convgru_ln)."""
    num_gates = 3

    def __init__(self, in_channels, hidden_channels, kernel_size=3, num_layers=1, bias=True, batch_first=True,
                 bidirectional=False, dropout=0.0, dilation=1, reset_after=True, input_to_all_layers=False,
                 strategy=None, norm=None):
        _check_norm(norm, strategy=strategy, reset_after=reset_after)
        self.input_to_all_layers = input_to_all_layers
        super().__init__(in_channels, hidden_channels, kernel_size, num_layers, bias, batch_first, bidirectional,
                         dropout, dilation, strategy)
        self.reset_after, self.norm = reset_after, norm
        if norm == "layer":
            for layer in range(num_layers):
                for suffix in self._suffixes(layer):
                    _norm_parameters(self, suffix, 3, self.hidden_channels[layer])
        self.reset_parameters()

    def _layer_input_channels(self, layer):
        channels = super()._layer_input_channels(layer)
        return channels + self.in_channels if (layer > 0 and self.input_to_all_layers) else channels

    def _layer_inputs(self, x, outputs, layer):
        inp = super()._layer_inputs(x, outputs, layer)
        return torch.cat([x, inp], 2) if (layer > 0 and self.input_to_all_layers) else inp

    def reset_parameters(self):
        for layer in range(self.num_layers):
            for suffix in self._suffixes(layer):
                w_ih, w_hh, b_ih, b_hh = self._params(suffix)
                _init_recurrent(self.hidden_channels[layer], [w_ih, w_hh], [b_ih, b_hh], False)
                _reset_norm(self, suffix)

    def forward(self, x: Tensor, h_0=None, lengths: Optional[Tensor] = None):
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: one leaf node (nn/_fx.py)
            return fx_leaf(self, x, h_0, lengths)
        def run_direction(inp, x, layer, d, suffix, index):
            h0 = None if h_0 is None else self._state_at(h_0, "h_0", index, x, self.hidden_channels[layer])
            w_ih, w_hh, b_ih, b_hh = self._params(suffix)
            if self.norm == "layer":
                _no_lengths_with_norm(lengths)
                return ops.convgru_ln(inp, w_ih, w_hh, b_ih, b_hh, h0, *_norm_args(self, suffix, 3),
                                      self.padding_of(layer), self.dilation[layer], reverse=d == 1)
            return ops.convgru(inp, w_ih, w_hh, b_ih, b_hh, h0, self.padding_of(layer), self.dilation[layer],
                               reset_after=self.reset_after, reverse=d == 1, strategy=self.strategy,
                               lengths=lengths)

        output, (h_n,) = self._run_layers(x, run_direction)
        return output, h_n


def _stack_states(states):
    """[num_layers*num_directions, B, C, H, W], or the list itself when layer widths differ. One state
    (one layer, one direction) is a view of it: no copy, and its frame layout (channels_last) kept."""
    if len(states) == 1:
        return states[0].unsqueeze(0)
    if all(s.shape == states[0].shape for s in states):
        return torch.stack(states)
    return states
