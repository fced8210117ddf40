"""Depthwise 3D convolution cases: ``nn.Conv3d(C, C, k, groups=C)`` vs ``fastvid.nn.DepthwiseConv3d``,
and an X3D-style bottleneck block native vs ``fastvid.convert(block)`` (issue 3, "Benchmarks and
targets").

Shared by the runner (``python -m fastvid bench``) and ``benchmarks/test_bench_depthwise.py``:

* :class:`DWShape` / :class:`DWCase` name a measurement: op (``DepthwiseConv3d`` or ``X3DBlock``),
  shape ``[B, C, T, H, W]`` (+ kernel and stride; ``inner`` channels for the block), dtype
  (``fp32``, or ``bf16`` autocast) and mode (``no_grad`` forward or ``fwd_bwd``).
* :func:`build` returns ``{'native': Workload, 'fastvid': Workload}`` with equal weights
  (``load_state_dict`` / deep copy + ``fastvid.convert``) and equal inputs, in the case's layout
  (``ncdhw``: contiguous, the default; ``cl3d``: channels_last_3d inputs and modules) for both
  providers.
* :func:`check_parity` asserts outputs and gradients (input and every parameter) agree before
  anything is timed.
* :func:`run_case` measures one case the runner's way (interleaved rounds, median/p20/p80) and,
  for the fastvid depthwise forward, adds a ``bandwidth`` row: achieved bytes/s =
  (input + output + weight bytes) / median time of the calls that faulted no output pages in
  (:func:`calls_without_page_faults`), next to the machine's copy bandwidth measured
  in the same process (:func:`copy_bandwidth`: ``y.copy_(x)`` of a 256 MiB fp32 tensor,
  bytes = 2 x size, median of a few calls).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import resource
import statistics
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

import fastvid
from fastvid.ops.depthwise3d import _output_size

from . import ceiling, measure, results
from .cases import assert_within, ieee_fp32, relative_error, seeded_randn_like, timed_step

PROVIDERS = ("native", "fastvid")
OPS = ("DepthwiseConv3d", "X3DBlock")
DTYPES = ("fp32", "bf16")
MODES = ("no_grad", "fwd_bwd")
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}
#: Relative error ‖a - b‖ / ‖b‖ allowed per compared tensor (per op and dtype), fastvid vs native.
#: Not for the fp32 X3D block: its batch norms (train mode) divide by per-channel std, which
#: amplifies fp32 rounding (the first BN's weight gradient is ill-conditioned: native and fastvid
#: fp32 are each ~1e-2 from a float64 run, in either layout), so no fixed tolerance between the two
#: is meaningful; it is judged against float64 by the flash-attention rule (ORACLE_RULE).
PARITY_RTOL = {("DepthwiseConv3d", "fp32"): 1e-4, ("DepthwiseConv3d", "bf16"): 3e-2, ("X3DBlock", "bf16"): 5e-2}
#: (factor, atol) of the oracle rule: err(fastvid vs fp64) <= factor · err(native vs fp64) + atol, per
#: tensor (relative errors as above), for the cases without a PARITY_RTOL.
ORACLE_RULE = (2.0, 1e-5)
#: Input/module memory layouts measured (both providers get the same): ``ncdhw`` (contiguous, the
#: default PyTorch layout) and ``cl3d`` (channels_last_3d). The first is the default.
LAYOUTS = ("ncdhw", "cl3d")
#: The rows' ``layout`` field per case layout (the report shows ``channels_last_3d`` as ``+cl3d``).
LAYOUT_ROW = {"ncdhw": "contiguous", "cl3d": "channels_last_3d"}

Triple = Tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class DWShape:
    """Input ``[B, C, T, H, W]``, cubic kernel ``k``, stride ``stride``; ``inner``: the X3D block's
    expanded channel count (0 for a bare depthwise conv)."""
    B: int
    C: int
    T: int
    H: int
    W: int
    k: int = 3
    stride: Triple = (1, 1, 1)
    inner: int = 0

    @property
    def label(self) -> str:
        s = "s1" if self.stride == (1, 1, 1) else "s" + "x".join(map(str, self.stride))
        inner = f",inner={self.inner}" if self.inner else ""
        return f"B={self.B},C={self.C}{inner},T={self.T},{self.H}x{self.W},k{self.k},{s}"

    @property
    def dims(self) -> Tuple[int, int, int, int, int]:
        return (self.B, self.C, self.T, self.H, self.W)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


#: The X3D shapes of issue 3, and the stride-2 block into X3D's last stage (14² → 7²). The first is
#: the quick one.
DW_SHAPES = (
    DWShape(4, 96, 8, 28, 28),
    DWShape(4, 192, 8, 14, 14),
    DWShape(4, 48, 8, 56, 56, stride=(1, 2, 2)),
    DWShape(4, 432, 8, 7, 7),
    DWShape(4, 192, 8, 14, 14, stride=(1, 2, 2)),
)
X3D_SHAPE = DWShape(4, 48, 8, 28, 28, inner=108)


@dataclasses.dataclass(frozen=True)
class DWCase:
    """One measurement (same fields as :class:`fastvid.bench.cases.Case`, other op/shape kinds)."""
    op: str
    shape: DWShape
    dtype: str
    mode: str
    layout: str = "ncdhw"

    def __post_init__(self):
        for value, allowed in ((self.op, OPS), (self.dtype, DTYPES), (self.mode, MODES), (self.layout, LAYOUTS)):
            if value not in allowed:
                raise ValueError(f"DWCase: {value!r} is not one of {allowed}")

    @property
    def channels_last(self) -> bool:
        """channels_last_3d inputs and modules, both providers."""
        return self.layout == "cl3d"

    @property
    def name(self) -> str:
        """Stable id, e.g. ``DepthwiseConv3d-B=4,C=96,T=8,28x28,k3,s1-fp32-ncdhw-no_grad``."""
        return f"{self.op}-{self.shape.label}-{self.dtype}-{self.layout}-{self.mode}"


def iter_cases(quick: bool = False, dtypes=("fp32",), modes=MODES, layouts=LAYOUTS) -> Iterator[DWCase]:
    """Depthwise cases (every shape of DW_SHAPES; ``quick``: the first one) in both modes, then the X3D
    block (forward+backward; plus forward in full runs), each in both layouts. bf16 autocast is
    available (``dtypes=("fp32", "bf16")``) but not run by default."""
    for shape in (DW_SHAPES[:1] if quick else DW_SHAPES):
        for dtype in dtypes:
            for layout in layouts:
                for mode in modes:
                    yield DWCase("DepthwiseConv3d", shape, dtype, mode, layout)
    for dtype in dtypes:
        for layout in layouts:
            for mode in (("fwd_bwd",) if quick else modes):
                if mode in modes:
                    yield DWCase("X3DBlock", X3D_SHAPE, dtype, mode, layout)


# ------------------------------------------------------------------------------ modules
class SqueezeExcite3d(nn.Module):
    """X3D's squeeze-excite: global average pool, 1x1x1 conv down, ReLU, 1x1x1 conv up, sigmoid, scale."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv3d(channels, reduced, 1)
        self.fc2 = nn.Conv3d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3, 4), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


def _se_channels(inner: int) -> int:
    """X3D: round_width(inner, 1/16) to a multiple of 8 (108 -> 8)."""
    return max(8, int(inner / 16 + 4) // 8 * 8)


class X3DBottleneck(nn.Sequential):
    """X3D-style bottleneck: 1x1x1 conv C->inner, BN, ReLU, channel-wise kxkxk conv, BN, SE, SiLU,
    1x1x1 conv inner->C, BN (no residual: the block as issue 3 lists it)."""

    def __init__(self, channels: int, inner: int, k: int = 3, stride: Triple = (1, 1, 1)):
        super().__init__(
            nn.Conv3d(channels, inner, 1, bias=False), nn.BatchNorm3d(inner), nn.ReLU(inplace=False),
            nn.Conv3d(inner, inner, k, stride, padding=k // 2, groups=inner, bias=False), nn.BatchNorm3d(inner),
            SqueezeExcite3d(inner, _se_channels(inner)), nn.SiLU(),
            nn.Conv3d(inner, channels, 1, bias=False), nn.BatchNorm3d(channels),
        )


def native_module(case: DWCase) -> nn.Module:
    s = case.shape
    if case.op == "DepthwiseConv3d":
        return nn.Conv3d(s.C, s.C, s.k, s.stride, padding=s.k // 2, groups=s.C)
    return X3DBottleneck(s.C, s.inner, s.k, s.stride)


def fastvid_module_like(native: nn.Module, case: DWCase) -> nn.Module:
    """The fastvid module with ``native``'s weights."""
    s = case.shape
    if case.op == "DepthwiseConv3d":
        module = fastvid.nn.DepthwiseConv3d(s.C, s.k, s.stride, padding=s.k // 2)
        module.load_state_dict(native.state_dict())
        return module
    return fastvid.convert(copy.deepcopy(native))


# ------------------------------------------------------------------------------ workloads
@dataclasses.dataclass
class Workload:
    """One provider's side of a case; ``workload()`` runs one timed step (as in cases.Workload:
    ``no_grad`` = one forward under no_grad; ``fwd_bwd`` = zero grads (set_to_none), forward,
    backward of a fixed upstream gradient; the input requires grad)."""
    case: DWCase
    provider: str
    module: nn.Module
    x: Tensor
    grad_output: Optional[Tensor] = None

    def autocast(self):
        dtype = AUTOCAST[self.case.dtype]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.x.device.type, dtype=dtype)

    def forward(self) -> Tensor:
        with self.autocast():
            return self.module(self.x)

    def __call__(self) -> Tensor:
        return timed_step(self, self.forward, self.case.mode == "no_grad")

    def zero_grad(self):
        self.x.grad = None
        self.module.zero_grad(set_to_none=True)

    def gradients(self) -> Dict[str, Tensor]:
        grads = {"x": self.x.grad}
        for i, p in enumerate(self.module.parameters()):  # same order: convert keeps the parameters
            grads[f"param{i}{tuple(p.shape)}"] = p.grad
        return grads


def make_input(case: DWCase, device="cpu", seed: int = 0) -> Tensor:
    """``[B, C, T, H, W]`` fp32 input, stored channels_last_3d for ``cl3d`` cases, else contiguous
    (the same values either way)."""
    B, C, T, H, W = case.shape.dims
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, T, H, W, C, generator=generator).permute(0, 4, 1, 2, 3)
    assert x.is_contiguous(memory_format=torch.channels_last_3d)
    if not case.channels_last:
        x = x.contiguous()
    return x.to(device)


def build(case: DWCase, device="cpu", seed: int = 0) -> Dict[str, Workload]:
    torch.manual_seed(seed)
    native = native_module(case).to(device)
    modules = {"native": native, "fastvid": fastvid_module_like(native, case).to(device)}
    x = make_input(case, device, seed)
    workloads = {}
    for provider, module in modules.items():
        if case.channels_last:
            module = module.to(memory_format=torch.channels_last_3d)
        module.train(case.mode == "fwd_bwd")  # block: BN batch statistics when training, running ones otherwise
        inp = x.clone()
        if case.mode == "fwd_bwd":
            inp.requires_grad_(True)
        workloads[provider] = Workload(case, provider, module, inp)
    return workloads


def without_depthwise(workload: Workload) -> Workload:
    """The X3D block's workload with its depthwise conv replaced by the identity (stride 1: same
    shapes): the time of the layers around it, the floor under any depthwise kernel (ceiling.py)."""
    module = copy.deepcopy(workload.module)
    assert isinstance(module, X3DBottleneck) and tuple(workload.case.shape.stride) == (1, 1, 1), \
        "without_depthwise: a stride-1 X3D block"
    module[3] = nn.Identity()
    x = workload.x.detach().clone().requires_grad_(workload.x.requires_grad)
    return Workload(workload.case, "without_depthwise", module, x, workload.grad_output)


# ------------------------------------------------------------------------------ parity
def compare(workloads: Dict[str, Workload], reference: str = "native") -> Dict[str, float]:
    """Relative errors of fastvid vs ``reference`` (a key of ``workloads``): output and, for fwd_bwd,
    input and parameter gradients. Module state (BN running statistics) is saved and restored around
    the comparison."""
    outs = {}
    for name, w in workloads.items():
        state = copy.deepcopy(w.module.state_dict())
        if w.case.mode == "no_grad":
            with torch.no_grad():
                outs[name] = w.forward()
        else:
            w.zero_grad()
            outs[name] = w.forward()
            if w.grad_output is None:
                w.grad_output = seeded_randn_like(outs[name], seed=1)
            outs[name].backward(w.grad_output)
        w.module.load_state_dict(state)
    native, fast = workloads[reference], workloads["fastvid"]
    if outs["fastvid"].shape != outs[reference].shape:
        raise AssertionError(f"{native.case.name}: output shapes differ: fastvid {tuple(outs['fastvid'].shape)}, "
                             f"{reference} {tuple(outs[reference].shape)}")
    errors = {"output": relative_error(outs["fastvid"], outs[reference])}
    if native.case.mode == "fwd_bwd":
        g_native, g_fast = native.gradients(), fast.gradients()
        if list(g_native) != list(g_fast):
            raise AssertionError(f"{native.case.name}: parameters differ after conversion: "
                                 f"fastvid {list(g_fast)}, native {list(g_native)}")
        for name, g in g_native.items():
            errors["grad_" + name] = relative_error(g_fast[name], g)
    return errors


def float64_twin(workload: Workload) -> Workload:
    """The native workload in float64 (same weights, input and upstream gradient): the oracle."""
    module = copy.deepcopy(workload.module).double()
    x = workload.x.detach().double().requires_grad_(workload.x.requires_grad)
    grad_output = None if workload.grad_output is None else workload.grad_output.double()
    return Workload(workload.case, "float64", module, x, grad_output)


def check_parity(workloads: Dict[str, Workload]) -> Dict[str, float]:
    """fastvid vs native within PARITY_RTOL; or, for cases without one, both against a float64 run
    by ORACLE_RULE. Returns the errors of fastvid (vs native, resp. vs float64)."""
    case = workloads["native"].case
    if (case.op, case.dtype) in PARITY_RTOL:
        return assert_within(case.name, compare(workloads), PARITY_RTOL[(case.op, case.dtype)])
    factor, atol = ORACLE_RULE
    ours = compare({"oracle": float64_twin(workloads["native"]), "fastvid": workloads["fastvid"]}, "oracle")
    native = compare({"oracle": float64_twin(workloads["native"]), "fastvid": workloads["native"]}, "oracle")
    bad = {k: (v, native[k]) for k, v in ours.items() if not v <= factor * native[k] + atol}
    if bad:
        raise AssertionError(f"{case.name}: fastvid's error vs float64 exceeds {factor:g} x native's + {atol:g}: "
                             + ", ".join(f"{k}={v:.2e} (native {n:.2e})" for k, (v, n) in bad.items()))
    return ours


# ------------------------------------------------------------------------------ bandwidth
COPY_BYTES = 256 * 2 ** 20
_copy_cache: Dict[str, Dict[str, float]] = {}


def calls_without_page_faults(timing: measure.Timings, output_bytes: int) -> List[float]:
    """Wall times of the calls in which the OS faulted in no more than 1 % of the output's pages.

    The bandwidth row measures the kernel against a copy into memory that is already mapped. A forward
    call's output is a fresh allocation: where glibc malloc has just handed the heap's top back to the
    OS (it trims after big frees, depending on what the other provider allocated and freed), every page
    of it is faulted in again during the call. In the bench's cycle after native's call that happened
    in half the calls, or in all of them, from run to run: 4x96x8x28^2 (9.6 MB of output, ~2,350 pages
    of 4 KiB) took 1.0-2.1 ms without faults and 3.1-5.3 ms with them on a 2-vCPU VM (~1 us per fault),
    so the median moved between the modes. The time rows keep every call (users pay the faults, and so
    does native); the bandwidth row counts the kernel's own memory traffic."""
    limit = 0.01 * output_bytes / resource.getpagesize()
    return [wall for wall, faults in zip(timing.wall, timing.minor_faults) if faults <= limit]


def gigabytes_per_second(nbytes: int, seconds: List[float]) -> Dict[str, float]:
    """``nbytes`` per call over call times ``seconds``: {'median', 'p20', 'p80'} in GB/s (p20 = the
    slower calls)."""
    stats = measure.summarize(seconds)
    return {"median": nbytes / stats["median"] / 1e9, "p20": nbytes / stats["p80"] / 1e9,
            "p80": nbytes / stats["p20"] / 1e9}


def copy_bandwidth(device="cpu", nbytes: int = COPY_BYTES, rounds: int = 5) -> Dict[str, float]:
    """The machine's copy bandwidth in GB/s: ``y.copy_(x)`` of an ``nbytes`` fp32 tensor, counted
    as 2 x nbytes (read + write), after one warm-up copy (which also faults ``y``'s pages in).
    ``{'median', 'p20', 'p80'}`` over ``rounds`` copies (:func:`gigabytes_per_second`).
    Measured once per process and device (the runner's "same run")."""
    key = str(device)
    if key not in _copy_cache:
        x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        y = torch.empty_like(x)
        seconds = measure.time_interleaved({"copy": lambda: y.copy_(x)}, rounds=rounds, warmup=1,
                                           device=device)["copy"].wall
        _copy_cache[key] = gigabytes_per_second(2 * nbytes, seconds)
        del x, y
    return _copy_cache[key]


def forward_bytes(workload: Workload) -> Dict[str, int]:
    """Bytes a depthwise forward must move at least: {'input', 'output', 'weights'} (weights: + bias)."""
    with torch.no_grad():
        y = workload.forward()
    return {"input": workload.x.numel() * workload.x.element_size(), "output": y.numel() * y.element_size(),
            "weights": sum(p.numel() * p.element_size() for p in workload.module.parameters())}


# ------------------------------------------------------------------------------ runner
def run_case(case: DWCase, rounds: int, warmup: int, device="cpu", memory: bool = True,
             base: Optional[dict] = None) -> List[dict]:
    """Measure one case; returns its rows (both providers' times; peak memory of fwd_bwd cases;
    the fastvid forward bandwidth for depthwise no_grad cases). Raises AssertionError on parity failure."""
    base = dict(base or {})
    workloads = build(case, device=device)
    with ieee_fp32():
        parity = check_parity(workloads)
    rows: List[dict] = []

    def add(provider, metric, unit, stats, **extra):
        rows.append({
            "op": case.op, "provider": provider, "mode": case.mode, "metric": metric, "unit": unit,
            # the layout is part of the shape label so the report keeps the two layouts' rows apart
            "shape": f"{case.shape.label},{case.layout}", **stats, "dtype": case.dtype, **base, "timestamp": results.now(),
            "shape_dims": case.shape.as_dict(), "layout": LAYOUT_ROW[case.layout], **extra,
        })

    fns = {name: workloads[name] for name in PROVIDERS}
    with_ceiling = case.dtype == "fp32" and torch.device(device).type == "cpu"
    if with_ceiling and case.op == "X3DBlock":
        fns["without_depthwise"] = without_depthwise(workloads["fastvid"])
    times = measure.time_interleaved(fns, rounds=rounds, warmup=warmup, device=device)
    medians = {}
    for provider in PROVIDERS:
        timing = times[provider]
        stats = measure.summarize(timing.wall)
        medians[provider] = stats["median"]
        add(provider, "time", "ms", {k: v * 1e3 for k, v in stats.items()}, rounds=len(timing.wall),  # (the budget
            # of --quick may time fewer than asked)
            parity_max_rel_error=max(parity.values()),
            minor_faults_per_call=statistics.median(timing.minor_faults),
            sys_ms_per_call=1e3 * statistics.median(timing.sys_seconds))

    if case.op == "DepthwiseConv3d" and case.mode == "no_grad":
        moved = forward_bytes(workloads["fastvid"])
        nbytes = sum(moved.values())
        timing = times["fastvid"]
        calls = calls_without_page_faults(timing, moved["output"])
        copy_bw = copy_bandwidth(device)
        achieved = gigabytes_per_second(nbytes, calls or timing.wall)
        every_call = gigabytes_per_second(nbytes, timing.wall)
        add("copy", "bandwidth", "GB/s", copy_bw, copy_bytes=2 * COPY_BYTES,
            note="y.copy_(x), 256 MiB fp32, bytes = 2 x size")
        add("fastvid", "bandwidth", "GB/s", achieved, bytes_per_call=nbytes, copy_GBps=copy_bw["median"],
            fraction_of_copy=achieved["median"] / copy_bw["median"],
            calls_counted=len(calls or timing.wall), calls_without_page_faults=len(calls),
            calls_timed=len(timing.wall), every_call_GBps=every_call["median"],
            every_call_fraction_of_copy=every_call["median"] / copy_bw["median"],
            note="(input + output + weight bytes) / median forward time over the timed calls in which the OS "
                 "faulted in no more than 1 % of the output's pages (every call where there are none)")

    if with_ceiling:
        s = case.shape
        channels = s.inner or s.C  # the depthwise conv's own channels (the X3D block's inner ones)
        out_positions = math.prod(_output_size(n, s.k, stride, s.k // 2, 1)
                                  for n, stride in zip((s.T, s.H, s.W), s.stride))
        taps = s.B * channels * ceiling.in_range_taps((s.T, s.H, s.W), s.k, s.stride, s.k // 2)
        work = ceiling.depthwise_work(s.B * channels * s.T * s.H * s.W, s.B * channels * out_positions, taps,
                                      case.mode)
        copy_gbps, fma_per_s = copy_bandwidth(device)["median"], ceiling.fma_peak()
        least = ceiling.least_seconds(work["bytes"], work["multiply_adds"], 1e9 * copy_gbps, fma_per_s)
        extra = dict(work, copy_GBps=copy_gbps, fma_G_per_s=fma_per_s / 1e9)
        if case.op == "X3DBlock":  # the block's other layers as measured, plus its depthwise conv's bound
            # their fastest call: a least time takes the optimistic figure (a noisy median had put
            # fastvid's median above its own 'least' time)
            rest = min(times["without_depthwise"].wall)
            least = dict(least, least_s=least["least_s"] + rest)
            extra["other_layers_ms"] = 1e3 * rest
        add("native", "ceiling", "ms", {k: v * 1e3 for k, v in measure.summarize(times["native"].wall).items()})
        add("bound", "ceiling", "ms", ceiling.bound_fields(least, **extra))

    if memory and case.mode == "fwd_bwd":
        for provider in PROVIDERS:
            workloads[provider].zero_grad()
            peak = measure.peak_memory_bytes(workloads[provider], device=device) / 2.0 ** 20
            add(provider, "peak_memory", "MiB", {"median": peak, "p20": peak, "p80": peak})
    return rows
