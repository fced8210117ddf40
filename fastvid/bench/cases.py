"""Benchmark cases: what is measured, and the two implementations it is measured on.

One definition serves both the runner (``python -m fastvid bench``) and the pytest-benchmark
suites under ``benchmarks/``:

* :class:`Shape` and :class:`Case` name a measurement: op (``ConvLSTM``/``ConvGRU``), shape,
  dtype (``fp32`` or ``bf16`` autocast) and mode (``no_grad`` forward or ``fwd_bwd``).
* :class:`NativeConvLSTM` / :class:`NativeConvGRU` are the baseline: the per-step module a user
  writes without fastvid (a Python loop of ``cat`` + conv + pointwise gate ops).
* :func:`build` returns a :class:`Workload` per provider (``native`` or ``fastvid``): the module,
  its input and one callable that runs one timed step. The fastvid module carries the same
  weights as the native one, and :func:`check_parity` asserts that both compute the same
  outputs and gradients before anything is timed: a benchmark of a wrong result is worthless.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Iterator, Optional

import torch
from torch import Tensor, nn

import fastvid

PROVIDERS = ("native", "fastvid")
OPS = ("ConvLSTM", "ConvGRU")
DTYPES = ("fp32", "bf16")
MODES = ("no_grad", "fwd_bwd")

#: Autocast dtype per dtype label; ``None`` = plain fp32, no autocast.
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}

#: Tolerances of the parity check: relative error ‖a - b‖ / ‖b‖ of every compared tensor.
#: bf16: both providers round to bf16, but at different places (fastvid keeps the gate math and
#: the cell state in fp32), so the two differ by a few bf16 ulps that accumulate over the steps.
PARITY_RTOL = {"fp32": 1e-4, "bf16": 3e-2}


@dataclasses.dataclass(frozen=True)
class Shape:
    """Input ``[B, T, C_in, H, W]``, hidden channels ``C``, square kernel ``kernel_size``."""
    B: int
    T: int
    C_in: int
    C: int
    H: int
    W: int
    kernel_size: int = 3

    @property
    def label(self) -> str:
        channels = f"C={self.C}" if self.C_in == self.C else f"C_in={self.C_in},C={self.C}"
        kernel = "" if self.kernel_size == 3 else f",k={self.kernel_size}"
        return f"B={self.B},T={self.T},{channels},{self.H}x{self.W}{kernel}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


#: The two shapes of issue 2, section 5. The first is the quick/default one.
SMALL = Shape(B=4, T=8, C_in=32, C=32, H=32, W=32)
LARGE = Shape(B=8, T=16, C_in=64, C=64, H=32, W=32)
SHAPES = (SMALL, LARGE)

#: Shapes per op in ``--quick`` runs: the first shape only for GRU (its large shape adds ~1 min: 5-minute budget), both for LSTM.
QUICK_SHAPES = {"ConvLSTM": (SMALL, LARGE), "ConvGRU": (SMALL,)}


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: ``op`` on ``shape`` in ``dtype`` ('fp32' or 'bf16' autocast) and ``mode``
    ('no_grad' forward or 'fwd_bwd' forward+backward). bf16 cases use channels_last frames (for
    both providers): that is the layout in which CPU bf16 convolutions are fast."""
    op: str
    shape: Shape
    dtype: str
    mode: str

    def __post_init__(self):
        for value, allowed in ((self.op, OPS), (self.dtype, DTYPES), (self.mode, MODES)):
            if value not in allowed:
                raise ValueError(f"Case: {value!r} is not one of {allowed}")

    @property
    def channels_last(self) -> bool:
        return self.dtype == "bf16"

    @property
    def name(self) -> str:
        """Stable id, e.g. ``ConvLSTM-B=4,T=8,C=32,32x32-fp32-fwd_bwd`` (pytest ids, groups)."""
        return f"{self.op}-{self.shape.label}-{self.dtype}-{self.mode}"


def iter_cases(quick: bool = False, ops=OPS, shapes=None, dtypes=DTYPES, modes=MODES) -> Iterator[Case]:
    """All cases, op-major. ``quick`` keeps the shapes of :data:`QUICK_SHAPES`; ``shapes``
    overrides the shape list for every op."""
    for op in ops:
        op_shapes = shapes if shapes is not None else (QUICK_SHAPES[op] if quick else SHAPES)
        for shape in op_shapes:
            for dtype in dtypes:
                for mode in modes:
                    yield Case(op, shape, dtype, mode)


# ------------------------------------------------------------------------------ the baseline
def _frame_format(x_t: Tensor):
    """The memory format a layout-aware user keeps the state in: the input frame's."""
    if x_t.is_contiguous(memory_format=torch.channels_last) and not x_t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class NativeConvLSTM(nn.Module):
    """The per-step ConvLSTM most code bases contain: one conv over ``cat([x_t, h])`` into the
    four gates (order i, f, g, o), sigmoid/tanh, ``c = f*c + i*g``, ``h = o*tanh(c)``; outputs
    stacked over time. Input ``[B, T, C_in, H, W]``; returns ``output, (h_n, c_n)`` like
    :class:`fastvid.nn.ConvLSTM` (11 dispatched compute ops per step)."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.conv = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size,
                              padding=kernel_size // 2)

    def forward(self, x: Tensor):
        B, T, _, H, W = x.shape
        fmt = _frame_format(x[:, 0])
        h = x.new_zeros(B, self.hidden_channels, H, W).contiguous(memory_format=fmt)
        c = torch.zeros_like(h)
        outputs = []
        for t in range(T):
            gates = self.conv(torch.cat([x[:, t], h], dim=1))
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h, c)


class NativeConvGRU(nn.Module):
    """The per-step ConvGRU with the ``nn.GRU`` formula: ``conv_x(x_t)`` and ``conv_h(h)`` into
    the gates (order r, z, n), ``n = tanh(x_n + r*h_n)``, ``h = (1-z)*n + z*h``. Input
    ``[B, T, C_in, H, W]``; returns ``output, h_n`` like :class:`fastvid.nn.ConvGRU`."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.conv_x = nn.Conv2d(in_channels, 3 * hidden_channels, kernel_size, padding=kernel_size // 2)
        self.conv_h = nn.Conv2d(hidden_channels, 3 * hidden_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor):
        B, T, _, H, W = x.shape
        fmt = _frame_format(x[:, 0])
        h = x.new_zeros(B, self.hidden_channels, H, W).contiguous(memory_format=fmt)
        outputs = []
        for t in range(T):
            x_r, x_z, x_n = self.conv_x(x[:, t]).chunk(3, dim=1)
            h_r, h_z, h_n = self.conv_h(h).chunk(3, dim=1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            h = (1 - z) * n + z * h
            outputs.append(h)
        return torch.stack(outputs, dim=1), h


def native_module(op: str, shape: Shape) -> nn.Module:
    cls = {"ConvLSTM": NativeConvLSTM, "ConvGRU": NativeConvGRU}[op]
    return cls(shape.C_in, shape.C, shape.kernel_size)


def fastvid_module_like(native: nn.Module, shape: Shape, strategy: Optional[str] = None) -> nn.Module:
    """The fastvid module computing exactly what ``native`` computes (same weights)."""
    if isinstance(native, NativeConvLSTM):
        module = fastvid.nn.ConvLSTM(shape.C_in, shape.C, shape.kernel_size, batch_first=True, strategy=strategy)
        # from_concat_conv splits the [x, h] conv into weight_ih / weight_hh (bias -> bias_ih).
        cell = fastvid.nn.ConvLSTMCell.from_concat_conv(native.conv, shape.C, gate_order="ifgo")
        weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    elif isinstance(native, NativeConvGRU):
        module = fastvid.nn.ConvGRU(shape.C_in, shape.C, shape.kernel_size, batch_first=True, strategy=strategy)
        weights = (native.conv_x.weight, native.conv_h.weight, native.conv_x.bias, native.conv_h.bias)
    else:
        raise TypeError(f"no fastvid equivalent known for {type(native).__name__}")
    with torch.no_grad():
        for name, value in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"), weights):
            getattr(module, name).copy_(value)
    return module.to(next(native.parameters()).device)


# ------------------------------------------------------------------------------ workloads
@dataclasses.dataclass
class Workload:
    """One provider's side of a case: ``workload()`` runs one timed step.

    ``no_grad``: one forward under ``torch.no_grad()``. ``fwd_bwd``: drop the old gradients
    (``set_to_none``, as ``optimizer.zero_grad()``), forward, then backward of a fixed upstream
    gradient of the output sequence (the input requires grad too, as inside a network). bf16:
    the forward runs under ``torch.autocast(dtype=torch.bfloat16)``, the backward outside it."""
    case: Case
    provider: str
    module: nn.Module
    x: Tensor
    grad_output: Optional[Tensor] = None

    def autocast(self):
        dtype = AUTOCAST[self.case.dtype]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.x.device.type, dtype=dtype)

    def forward(self):
        """``output, state`` of one forward in the case's dtype (grad mode as the caller's)."""
        with self.autocast():
            return self.module(self.x)

    def __call__(self) -> Tensor:
        return timed_step(self, lambda: self.forward()[0], self.case.mode == "no_grad")

    def zero_grad(self):
        self.x.grad = None
        self.module.zero_grad(set_to_none=True)

    def gradients(self) -> Dict[str, Tensor]:
        """Input and weight gradients, under the fastvid parameter names (for the parity check)."""
        grads = {"x": self.x.grad}
        m = self.module
        if isinstance(m, NativeConvLSTM):
            C_in = self.case.shape.C_in
            grads.update(weight_ih=m.conv.weight.grad[:, :C_in], weight_hh=m.conv.weight.grad[:, C_in:],
                         bias=m.conv.bias.grad)
        elif isinstance(m, NativeConvGRU):
            grads.update(weight_ih=m.conv_x.weight.grad, weight_hh=m.conv_h.weight.grad,
                         bias_ih=m.conv_x.bias.grad, bias_hh=m.conv_h.bias.grad)
        else:
            grads.update(weight_ih=m.weight_ih_l0.grad, weight_hh=m.weight_hh_l0.grad)
            if self.case.op == "ConvLSTM":  # the native LSTM has one bias: compare the summed gradient
                grads["bias"] = m.bias_ih_l0.grad
            else:
                grads.update(bias_ih=m.bias_ih_l0.grad, bias_hh=m.bias_hh_l0.grad)
        return grads


def timed_step(workload, forward: Callable[[], Tensor], no_grad: bool) -> Tensor:
    """One timed step of a benchmark workload (every family's ``Workload`` runs this): with
    ``no_grad``, ``forward()`` under ``torch.no_grad()``; else ``workload.zero_grad()``, ``forward()``,
    then backward of ``workload.grad_output``, a seeded gradient fixed on the first call (in the
    output's dtype/layout). Returns the output."""
    if no_grad:
        with torch.no_grad():
            return forward()
    workload.zero_grad()
    output = forward()
    if workload.grad_output is None:
        workload.grad_output = seeded_randn_like(output, seed=1)
    output.backward(workload.grad_output)
    return output


def seeded_randn_like(t: Tensor, seed: int) -> Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    values = torch.randn(t.shape, generator=generator, dtype=torch.float32)
    return torch.empty_like(t).copy_(values)  # empty_like keeps t's dtype, device and layout


def make_input(case: Case, device="cpu", seed: int = 0) -> Tensor:
    """``[B, T, C_in, H, W]`` fp32 input; frames are channels_last for bf16 cases."""
    s = case.shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if case.channels_last:  # stored [B, T, H, W, C]: every frame x[:, t] is channels_last
        x = torch.randn(s.B, s.T, s.H, s.W, s.C_in, generator=generator).permute(0, 1, 4, 2, 3)
    else:
        x = torch.randn(s.B, s.T, s.C_in, s.H, s.W, generator=generator)
    return x.to(device)


def build(case: Case, device="cpu", strategy: Optional[str] = None, seed: int = 0) -> Dict[str, Workload]:
    """``{'native': Workload, 'fastvid': Workload}`` with equal weights and equal inputs.
    ``strategy`` is passed to the fastvid module (None = auto choice)."""
    torch.manual_seed(seed)
    native = native_module(case.op, case.shape).to(device)
    modules = {"native": native, "fastvid": fastvid_module_like(native, case.shape, strategy)}
    x = make_input(case, device, seed)
    workloads = {}
    for provider, module in modules.items():
        if case.channels_last:
            module = module.to(memory_format=torch.channels_last)
        inp = x.clone()  # clone keeps the strides (channels_last frames stay channels_last)
        if case.mode == "fwd_bwd":
            inp.requires_grad_(True)
        workloads[provider] = Workload(case, provider, module, inp)
    return workloads


# ------------------------------------------------------------------------------ parity
def relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


def compare(workloads: Dict[str, Workload]) -> Dict[str, float]:
    """Relative errors of fastvid against native: the output, the final state and, for
    ``fwd_bwd`` cases, the input and weight gradients. Runs one step of each provider."""
    native, fast = workloads["native"], workloads["fastvid"]
    errors = {}
    outs = {}
    for name, w in workloads.items():
        if w.case.mode == "no_grad":
            with torch.no_grad():
                outs[name] = w.forward()
        else:
            w.zero_grad()
            outs[name] = w.forward()
            if w.grad_output is None:
                w.grad_output = seeded_randn_like(outs[name][0], seed=1)
            outs[name][0].backward(w.grad_output)
    (out_n, state_n), (out_f, state_f) = outs["native"], outs["fastvid"]
    errors["output"] = relative_error(out_f, out_n)
    h_n = state_n[0] if isinstance(state_n, tuple) else state_n
    h_f = (state_f[0] if isinstance(state_f, tuple) else state_f)[0]  # [layers*dirs, B, ...] -> layer 0
    errors["h_n"] = relative_error(h_f, h_n)
    if native.case.mode == "fwd_bwd":
        grads_f = fast.gradients()
        for name, g_native in native.gradients().items():
            errors["grad_" + name] = relative_error(grads_f[name], g_native)
    return errors


def check_parity(workloads: Dict[str, Workload]) -> Dict[str, float]:
    """Assert that fastvid matches native (see :data:`PARITY_RTOL`); returns the errors."""
    case = workloads["native"].case
    return assert_within(case.name, compare(workloads), PARITY_RTOL[case.dtype])


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 convolutions and matrix products without TF32, for the parity checks: on a GPU cuDNN's default
    TF32 convolutions (10-bit mantissa) put either provider ~1e-3 from fp32, beyond the tolerances. The
    timed calls keep PyTorch's defaults, the same for both providers."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_within(case_name: str, errors: Dict[str, float], tolerance: float) -> Dict[str, float]:
    """Raise unless every relative error is within ``tolerance`` (NaN fails); returns ``errors``."""
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    if bad:
        raise AssertionError(f"{case_name}: fastvid differs from native beyond relative error {tolerance}: "
                             + ", ".join(f"{k}={v:.2e}" for k, v in bad.items()))
    return errors


def strategy_of(run: Callable[[], object]) -> str:
    """Run ``run()`` and return the strategy fastvid's auto choice picked during it ('hoisted' or
    'concat'); '' when it picked none (forced strategy, or chosen by an earlier call)."""
    before = set(fastvid.ops.chosen_strategies())
    run()
    new = [v for k, v in fastvid.ops.chosen_strategies().items() if k not in before]
    return ",".join(sorted(set(new)))


