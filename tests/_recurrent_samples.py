"""Shared sample inputs for the ConvLSTM / ConvGRU tests.

One list of samples feeds the value, gradient and ``opcheck`` tests (the pytorch/extension-cpp
habit). Every sample is drawn in float64 from a seeded generator and then rounded to the test
dtype, so the oracle (``fastvid.reference.recurrent`` run in float64 on the *same rounded*
values) sees exactly what the kernel saw.

Layouts of the frame tensors:

* ``contiguous``
* ``channels_last``: frames in channels-last memory, ``x.permute(0, 1, 3, 4, 2).contiguous()
  .permute(0, 1, 4, 2, 3)``; states ``[B, C, H, W]`` channels_last.
* ``channels_last_b1``: the same with B = 1 (with B = 1 a frame ``x[:, t]`` of that layout is
  channels_last-contiguous in torch's sense, so the kernels' channels-last path is taken).
* ``noncontiguous``: ``x`` is a strided time slice and channel slice of a bigger tensor, states
  are width slices of bigger tensors.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

import fastvid
from fastvid.reference import recurrent as ref
from _tolerances import assert_full_precision, assert_low_precision, low_precision_bound

# float32 / float64: 2^9 ulps of the largest value: every step's convolutions sum ~C·k² products, and
# T steps feed one another (the state carries the rounding of every earlier step)
RECURRENT_ULPS = 2.0 ** 9

B, T, C_IN, C, H, W = 2, 3, 3, 4, 5, 6

DTYPES = (torch.float64, torch.float32, torch.bfloat16)
SEQ_LAYOUTS = ("contiguous", "channels_last", "channels_last_b1", "noncontiguous")
CELL_LAYOUTS = ("contiguous", "channels_last", "mixed", "noncontiguous")
STRATEGIES = ("hoisted", "concat")
STRATEGY_CODES = {"hoisted": 0, "concat": 1}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the LSTM cell state (fp32 for bf16/fp16 inputs)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ------------------------------------------------------------------------------------ layouts
def channels_last_frames(x: torch.Tensor) -> torch.Tensor:
    """[B, T, C, H, W] with the channels innermost in memory."""
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def noncontiguous_frames(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` [B, T, C, H, W], viewed as a time and channel slice of a bigger tensor."""
    b, t, c, h, w = x.shape
    big = torch.full((b, 2 * t, c + 2, h, w), float("nan"), dtype=x.dtype)
    big[:, 1::2, 1:1 + c] = x
    view = big[:, 1::2, 1:1 + c]
    assert not view.is_contiguous() or b * t == 1  # one frame of a slice is just an offset view
    return view


def noncontiguous_planes(s: torch.Tensor) -> torch.Tensor:
    """The same values as ``s`` [..., W], viewed as a width slice of a bigger tensor."""
    big = torch.full((*s.shape[:-1], s.shape[-1] + 3), float("nan"), dtype=s.dtype)
    big[..., 2:2 + s.shape[-1]] = s
    view = big[..., 2:2 + s.shape[-1]]
    assert not view.is_contiguous() or s[..., 0].numel() == 1  # one row of a slice is just an offset view
    return view


def channel_slice(s: torch.Tensor) -> torch.Tensor:
    """The same values as ``s`` [B, C, H, W], viewed as a channel slice of a bigger tensor."""
    big = torch.full((s.shape[0], s.shape[1] + 3, *s.shape[2:]), float("nan"), dtype=s.dtype)
    big[:, 1:1 + s.shape[1]] = s
    return big[:, 1:1 + s.shape[1]]


def frames_in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return x.contiguous()
    if layout.startswith("channels_last"):
        return channels_last_frames(x)
    if layout == "noncontiguous":
        return noncontiguous_frames(x)
    raise ValueError(layout)


def plane_in_layout(s: torch.Tensor, layout: str) -> torch.Tensor:
    if layout in ("contiguous", "mixed"):
        return s.contiguous()
    if layout.startswith("channels_last"):
        return s.contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        return noncontiguous_planes(s)
    raise ValueError(layout)


def leaf(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` as a leaf requiring grad, keeping its strides."""
    return None if t is None else t.detach().requires_grad_(True)


# ------------------------------------------------------------------------------ sequence samples
@dataclasses.dataclass(frozen=True)
class SeqConfig:
    """One ConvLSTM / ConvGRU layer configuration."""
    kind: str  # "lstm" | "gru"
    bias: str = "both"  # lstm: "both" (summed bias) | "none"; gru: "both" | "none" | "ih" | "hh"
    peephole: bool = False  # lstm only
    reset_after: bool = True  # gru only
    kernel: tuple = (3, 3)
    dilation: tuple = (1, 1)

    @property
    def num_gates(self) -> int:
        return 4 if self.kind == "lstm" else 3

    @property
    def padding(self) -> tuple:
        return tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel))

    def id(self) -> str:
        parts = [self.kind, f"bias-{self.bias}"]
        if self.kind == "lstm":
            parts.append("peephole" if self.peephole else "nopeephole")
        else:
            parts.append("reset_after" if self.reset_after else "ballas")
        if self.kernel != (3, 3):
            parts.append(f"k{self.kernel[0]}x{self.kernel[1]}")
        if self.dilation != (1, 1):
            parts.append(f"d{self.dilation[0]}x{self.dilation[1]}")
        return "-".join(parts)


SEQ_CONFIGS = [
    SeqConfig("lstm", bias="both", peephole=True),
    SeqConfig("lstm", bias="none", peephole=False, kernel=(3, 5), dilation=(2, 1)),
    SeqConfig("gru", bias="both", reset_after=True),
    SeqConfig("gru", bias="hh", reset_after=True, kernel=(1, 3)),
    SeqConfig("gru", bias="both", reset_after=False),
    SeqConfig("gru", bias="ih", reset_after=False, dilation=(1, 2)),
]
LSTM_CONFIGS = [c for c in SEQ_CONFIGS if c.kind == "lstm"]
GRU_CONFIGS = [c for c in SEQ_CONFIGS if c.kind == "gru"]


class _TensorSet:
    """Shared by the samples: ``tensors`` maps argument name -> tensor (None when absent)."""
    tensors: dict
    cell_state: str  # the LSTM cell-state argument, which keeps the cell-state dtype rule

    @property
    def names(self) -> list:
        """The tensor arguments that are present, in call order (gradients are taken w.r.t. these)."""
        return [k for k, v in self.tensors.items() if v is not None]

    def leaves(self) -> dict:
        return {k: leaf(v) for k, v in self.tensors.items()}

    def converted(self, dtype: torch.dtype, requires_grad: bool = True) -> dict:
        """The same values in ``dtype`` (contiguous); the LSTM cell state keeps the cell-state dtype rule."""
        out = {}
        for k, v in self.tensors.items():
            if v is None:
                out[k] = None
                continue
            d = acc_dtype(dtype) if k == self.cell_state else dtype
            out[k] = v.detach().to(d).contiguous().requires_grad_(requires_grad)
        return out


@dataclasses.dataclass
class SeqSample(_TensorSet):
    """Inputs of one sequence call: ``tensors`` maps argument name -> tensor (None when absent)."""
    config: SeqConfig
    reverse: bool
    dtype: torch.dtype
    layout: str
    tensors: dict

    cell_state = "c0"  # the argument kept in the cell-state dtype by converted()

    def run_ops(self, tensors: dict, strategy: Optional[str]):
        """fastvid.ops.convlstm / convgru on ``tensors``; returns the tuple of outputs."""
        c = self.config
        if c.kind == "lstm":
            return fastvid.ops.convlstm(tensors["x"], tensors["weight_ih"], tensors["weight_hh"], tensors["bias"],
                                        tensors["h0"], tensors["c0"], tensors["peephole"], padding=None,
                                        dilation=c.dilation, reverse=self.reverse, strategy=strategy)
        return fastvid.ops.convgru(tensors["x"], tensors["weight_ih"], tensors["weight_hh"], tensors["bias_ih"],
                                   tensors["bias_hh"], tensors["h0"], padding=None, dilation=c.dilation,
                                   reset_after=c.reset_after, reverse=self.reverse, strategy=strategy)

    def run_reference(self, tensors: dict):
        c = self.config
        if c.kind == "lstm":
            return ref.convlstm_sequence(tensors["x"], tensors["weight_ih"], tensors["weight_hh"], tensors["bias"],
                                         tensors["h0"], tensors["c0"], tensors["peephole"], c.padding, c.dilation,
                                         self.reverse)
        return ref.convgru_sequence(tensors["x"], tensors["weight_ih"], tensors["weight_hh"], tensors["bias_ih"],
                                    tensors["bias_hh"], tensors["h0"], c.padding, c.dilation, c.reset_after,
                                    self.reverse)

    def op_args(self, tensors: dict, strategy: int, save: bool) -> tuple:
        """Arguments of torch.ops.fastvid.convlstm_sequence / convgru_sequence."""
        c = self.config
        tt = tensors
        cl = frames_are_channels_last(tt["x"])
        if c.kind == "lstm":
            return (tt["x"], tt["weight_ih"], tt["weight_hh"], tt["bias"], tt["h0"], tt["c0"], tt["peephole"],
                    list(c.padding), list(c.dilation), self.reverse, strategy, cl, save)
        return (tt["x"], tt["weight_ih"], tt["weight_hh"], tt["bias_ih"], tt["bias_hh"], tt["h0"], list(c.padding),
                list(c.dilation), c.reset_after, self.reverse, strategy, cl, save)

    def backward_op_args(self, tensors: dict, strategy: int, grads: tuple, forward: tuple) -> tuple:
        """Arguments of the *_sequence_backward op given forward outputs (save=True) and output grads."""
        c = self.config
        tt = tensors
        if c.kind == "lstm":
            output, _, _, reserve = forward
            return (grads[0], grads[1], grads[2], tt["x"], tt["weight_ih"], tt["weight_hh"], tt["bias"] is not None,
                    tt["h0"], tt["c0"], tt["peephole"], output, reserve, list(c.padding),
                    list(c.dilation), self.reverse, strategy, frames_are_channels_last(tt["x"]))
        output, _, reserve = forward
        return (grads[0], grads[1], tt["x"], tt["weight_ih"], tt["weight_hh"], tt["bias_ih"], tt["bias_hh"], tt["h0"],
                output, reserve, list(c.padding), list(c.dilation), c.reset_after, self.reverse, strategy,
                frames_are_channels_last(tt["x"]))


def frames_are_channels_last(x) -> bool:
    """The layout flag the public API passes to the sequence ops (frames with channels innermost)."""
    return x.shape[2] > 1 and x.shape[4] > 1 and x.stride(2) < x.stride(4)


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def make_seq_sample(config: SeqConfig, reverse: bool = False, dtype: torch.dtype = torch.float64,
                    layout: str = "contiguous", shape: Optional[tuple] = None, seed: int = 0) -> SeqSample:
    """Random inputs for one layer. Weights are scaled by 1/sqrt(fan_in) so the gates are not
    saturated (saturated gates would hide gradient errors). ``shape`` = (B, T, C_in, C, H, W)."""
    b, t, c_in, c, h, w = shape or (B, T, C_IN, C, H, W)
    if layout == "channels_last_b1":
        b = 1
    gen = torch.Generator().manual_seed(seed * 7919 + SEQ_CONFIGS.index(config) if config in SEQ_CONFIGS else seed)
    G = config.num_gates
    kh, kw = config.kernel
    x = _randn(gen, b, t, c_in, h, w)
    weight_ih = _randn(gen, G * c, c_in, kh, kw, scale=1.5 / math.sqrt(c_in * kh * kw))
    weight_hh = _randn(gen, G * c, c, kh, kw, scale=1.5 / math.sqrt(c * kh * kw))
    h0 = _randn(gen, b, c, h, w, scale=0.5)
    tensors = {"x": x, "weight_ih": weight_ih, "weight_hh": weight_hh}
    if config.kind == "lstm":
        tensors["bias"] = _randn(gen, G * c, scale=0.5) if config.bias == "both" else None
        tensors["h0"] = h0
        tensors["c0"] = _randn(gen, b, c, h, w)
        tensors["peephole"] = _randn(gen, 3, c, scale=0.5) if config.peephole else None
    else:
        tensors["bias_ih"] = _randn(gen, G * c, scale=0.5) if config.bias in ("both", "ih") else None
        tensors["bias_hh"] = _randn(gen, G * c, scale=0.5) if config.bias in ("both", "hh") else None
        tensors["h0"] = h0
    out = {}
    for k, v in tensors.items():
        if v is None:
            out[k] = None
            continue
        v = v.to(acc_dtype(dtype) if k == "c0" else dtype)
        if k == "x":
            v = frames_in_layout(v, layout)
        elif k in ("h0", "c0"):
            v = plane_in_layout(v, layout)
        out[k] = v
    return SeqSample(config, reverse, dtype, layout, out)


def upstream_grads(outputs, seed: int = 1) -> tuple:
    """Random upstream gradients for every output (same dtype as the output), drawn in float64."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(_randn(gen, *o.shape).to(o.dtype) for o in outputs)


# ---------------------------------------------------------------------------------- cell samples
@dataclasses.dataclass(frozen=True)
class CellConfig:
    op: str  # "lstm_cell" | "gru_cell" | "gru_reset_hidden"
    peephole: bool = False
    reset_after: bool = True

    def id(self) -> str:
        if self.op == "lstm_cell":
            return "lstm_cell-" + ("peephole" if self.peephole else "nopeephole")
        if self.op == "gru_cell":
            return "gru_cell-" + ("reset_after" if self.reset_after else "ballas")
        return self.op


CELL_CONFIGS = [
    CellConfig("lstm_cell", peephole=False),
    CellConfig("lstm_cell", peephole=True),
    CellConfig("gru_cell", reset_after=True),
    CellConfig("gru_cell", reset_after=False),
    CellConfig("gru_reset_hidden"),
]


@dataclasses.dataclass
class CellSample(_TensorSet):
    config: CellConfig
    dtype: torch.dtype
    layout: str
    tensors: dict

    cell_state = "c_prev"

    def op_args(self, tensors: dict) -> tuple:
        tt = tensors
        if self.config.op == "lstm_cell":
            return tt["gates_pre"], tt["c_prev"], tt["peephole"]
        if self.config.op == "gru_cell":
            return tt["x_gates"], tt["h_gates"], tt["h_prev"], self.config.reset_after
        return tt["x_r"], tt["h_r"], tt["h_prev"]

    def op(self):
        return getattr(torch.ops.fastvid, self.config.op).default

    def run_ops(self, tensors: dict) -> tuple:
        """The public fastvid.ops function; always returns a tuple."""
        out = getattr(fastvid.ops, self.config.op)(*self.op_args(tensors))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def run_reference(self, tensors: dict) -> tuple:
        """The reference with the same outputs as the raw op (incl. the gates / cache)."""
        out = getattr(ref, self.config.op)(*self.op_args(tensors))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    @property
    def num_public_outputs(self) -> int:
        return {"lstm_cell": 2, "gru_cell": 1, "gru_reset_hidden": 1}[self.config.op]


def make_cell_sample(config: CellConfig, dtype: torch.dtype = torch.float64, layout: str = "contiguous",
                     shape: Optional[tuple] = None, seed: int = 0) -> CellSample:
    """Random cell inputs, pre-activations ~ N(0, 1.5²). ``shape`` = (B, C, H, W)."""
    b, c, h, w = shape or (B, C, H, W)
    gen = torch.Generator().manual_seed(seed * 7919 + CELL_CONFIGS.index(config) if config in CELL_CONFIGS else seed)
    if config.op == "lstm_cell":
        tensors = {"gates_pre": _randn(gen, b, 4 * c, h, w, scale=1.5), "c_prev": _randn(gen, b, c, h, w),
                   "peephole": _randn(gen, 3, c, scale=0.5) if config.peephole else None}
    elif config.op == "gru_cell":
        tensors = {"x_gates": _randn(gen, b, 3 * c, h, w, scale=1.5), "h_gates": _randn(gen, b, 3 * c, h, w),
                   "h_prev": _randn(gen, b, c, h, w)}
    else:
        tensors = {"x_r": _randn(gen, b, c, h, w, scale=1.5), "h_r": _randn(gen, b, c, h, w),
                   "h_prev": _randn(gen, b, c, h, w)}
    out = {}
    first = True
    for k, v in tensors.items():
        if v is None:
            out[k] = None
            continue
        v = v.to(acc_dtype(dtype) if k == "c_prev" else dtype)
        if v.dim() == 4:
            if layout == "mixed":  # first operand channels_last, the others contiguous
                v = v.contiguous(memory_format=torch.channels_last) if first else v.contiguous()
            elif layout == "noncontiguous":
                v = channel_slice(v)
                assert not v.is_contiguous()
            else:
                v = plane_in_layout(v, layout)
            first = False
        out[k] = v
    return CellSample(config, dtype, layout, out)


# ------------------------------------------------------------------------------------ comparison
LOW_PRECISION = (torch.bfloat16, torch.float16)


def assert_parity(actual, oracle, dtype, what, comparator=None, grad=False):
    """``actual`` (computed in ``dtype``) against ``oracle`` (float64, same rounded inputs), by the rule
    of tests/_tolerances.py. bf16/fp16: the flash-attention rule with ``comparator`` (the reference run
    in that dtype: fp32 gate math on convolutions in the dtype, states rounded each step like the
    kernels') as yardstick; ``grad=True`` allows 2 ulps of slack for gradients, which the kernels
    take through the activated gates they cached in the input dtype (sigma'(a) = s(1 - s) from a
    rounded s), which the fp32-internal reference never rounds."""
    if oracle is None:
        assert actual is None, f"{what}: expected None, got a tensor"
        return
    assert actual is not None, f"{what}: missing (None) where the reference has a value"
    if dtype in LOW_PRECISION:
        assert comparator is not None
        ulps = 2.0 if grad else 1.0
        if actual.dtype in LOW_PRECISION:
            assert_low_precision(actual, oracle, dtype, what, yardstick=comparator, ulps=ulps)
        else:  # the LSTM cell state, kept in fp32: held to the same bound
            err = (actual.detach().double() - oracle.detach().double()).abs().max().item()
            bound = low_precision_bound(oracle, comparator, dtype, ulps, what)
            assert err <= bound, f"{what}: error {err:.3g} > allowed {bound:.3g} (flash-attention rule, {dtype})"
        return
    assert_full_precision(actual, oracle, what, ulps=RECURRENT_ULPS)
