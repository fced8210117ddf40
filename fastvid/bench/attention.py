"""Nonlocal attention cases (issue 4, "Benchmarks and targets").

* op level (``NonlocalAttention``): ``fastvid.ops.nonlocal_attention`` vs the naive
  ``softmax(q kᵀ · scale) v`` (provider ``native``) and vs ``F.scaled_dot_product_attention``
  (provider ``sdpa``; the report shows it as a second comparison, "NonlocalAttention vs SDPA");
  forward+backward also with ``save_scores=True`` (provider ``fastvid_saved``: the scores kept for
  the backward; the report's "NonlocalAttention save_scores vs SDPA");
  B = 2, D = Dv = 128, (N, M) from the issue.
* block level (``NonLocalBlock``): the naive nonlocal block a user writes (:class:`NaiveNonLocal3d`:
  1×1×1 convs, max-pool (1,2,2) on φ and g, explicit ``softmax(θᵀφ) g``, output conv + BN) vs the same
  block after ``fastvid.convert`` (a :class:`fastvid.nn.NonLocalBlock` sharing its weights);
  C = 256, inter = 128, B = 2, (T, H, W) from the issue, training mode.
* peak memory: the process's resident-memory high-water mark in a fresh subprocess per case and
  provider (``python -m fastvid.bench.attention --peak CASE PROVIDER``; the median of
  :data:`PEAK_RUNS` such subprocesses): after a warm-up call on a
  tiny input (library start-up, thread pools) and after building the inputs, the high-water mark
  is reset (``/proc/self/clear_refs``), one timed step runs, and the row is the high-water mark
  minus the resident size just before the step (so inputs, weights and libraries do not count).
  With glibc's default malloc this includes heap memory freed but not returned to the system (its
  mmap threshold rises to the size of freed blocks, up to 32 MiB, so blocks of that size are then
  served from the heap); ``peak_allocated`` rows give the tensors' own peak (profiler, in process).
* FLOP rate (op level): each provider's time row carries ``gflop_per_s`` = :func:`attention_flops`
  / median time and ``fraction_of_sgemm``, that rate over the machine's best fp32 GEMM rate on the
  kernel's tile shapes measured in the same run (:func:`sgemm_rate`, torch's BLAS): how a provider
  compares with the BLAS rate that bounds a GEMM-bound op built on it (every flash-style provider
  does the same GEMM FLOPs). fastvid's fp32 tiles on the AVX-512/AVX2 paths run its own GEMM, not
  the BLAS, so its fraction can exceed 1 (on AMD CPUs MKL's sgemm runs its AVX2 kernel).
* :data:`MEMORY_BUDGET_MIB`: the budget the largest cases are judged against (the report's
  ``fits budget`` note: naive over it, fastvid under it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastvid

from . import ceiling, depthwise, measure, results
from .cases import assert_within, ieee_fp32, relative_error, timed_step

OPS = ("NonlocalAttention", "NonLocalBlock")
MODES = ("no_grad", "fwd_bwd")
PARITY_RTOL = {"NonlocalAttention": 1e-4, "NonLocalBlock": 1e-3}
MEMORY_BUDGET_MIB = 512  # a stated budget for one layer step (activations + gradients) at the largest cases


@dataclasses.dataclass(frozen=True)
class AttnShape:
    """Op: q ``[B, N, D]``, k/v ``[B, M, D]``. Block: x ``[B, C, T, H, W]`` (``inter`` channels,
    N = T·H·W, M = N/4 after the (1,2,2) pool)."""
    B: int
    N: int = 0
    M: int = 0
    D: int = 128
    C: int = 0
    inter: int = 0
    T: int = 0
    H: int = 0
    W: int = 0

    @property
    def label(self) -> str:
        if self.C:
            return f"B={self.B},C={self.C},inter={self.inter},T={self.T},{self.H}x{self.W}"
        return f"B={self.B},N={self.N},M={self.M},D={self.D}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


OP_SHAPES = (AttnShape(2, 1568, 392), AttnShape(2, 6272, 1568), AttnShape(2, 12544, 3136))
BLOCK_SHAPES = tuple(AttnShape(2, C=256, inter=128, T=t, H=h, W=w) for t, h, w in
                     ((4, 14, 14), (8, 14, 14), (8, 28, 28), (16, 28, 28)))


@dataclasses.dataclass(frozen=True)
class AttnCase:
    op: str
    shape: AttnShape
    mode: str
    dtype: str = "fp32"

    @property
    def name(self) -> str:
        return f"{self.op}-{self.shape.label}-{self.dtype}-{self.mode}"

    @property
    def providers(self):
        if self.op != "NonlocalAttention":
            return ("native", "fastvid")
        # save_scores changes nothing without a backward
        return ("native", "sdpa", "fastvid") + (("fastvid_saved",) if self.mode == "fwd_bwd" else ())


def iter_cases(quick: bool = False) -> Iterator[AttnCase]:
    """Full: every op and block shape in both modes. Quick: the op at N = 6272 and the block at
    (8, 28, 28), forward+backward only."""
    for shape in (OP_SHAPES[1:2] if quick else OP_SHAPES):
        for mode in (("fwd_bwd",) if quick else MODES):
            yield AttnCase("NonlocalAttention", shape, mode)
    for shape in (BLOCK_SHAPES[2:3] if quick else BLOCK_SHAPES):
        for mode in (("fwd_bwd",) if quick else MODES):
            yield AttnCase("NonLocalBlock", shape, mode)


# ------------------------------------------------------------------------------ the naive block
class NaiveNonLocal3d(nn.Module):
    """The nonlocal block as usually written (Wang et al. 2018, embedded Gaussian): θ, φ, g 1×1×1
    convs, φ and g max-pooled (1,2,2), the (THW)×(THW/4) affinity matrix materialised and
    softmax-normalised, y = f g, z = x + BN(W y) with BN's γ = 0 at initialisation."""

    def __init__(self, channels: int, inter: int):
        super().__init__()
        self.inter_channels = inter
        self.theta = nn.Conv3d(channels, inter, 1)
        self.phi = nn.Sequential(nn.Conv3d(channels, inter, 1), nn.MaxPool3d((1, 2, 2)))
        self.g = nn.Sequential(nn.Conv3d(channels, inter, 1), nn.MaxPool3d((1, 2, 2)))
        self.W = nn.Sequential(nn.Conv3d(inter, channels, 1), nn.BatchNorm3d(channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        theta = self.theta(x).view(B, self.inter_channels, -1).transpose(1, 2)   # [B, N, inter]
        phi = self.phi(x).view(B, self.inter_channels, -1)                       # [B, inter, M]
        g = self.g(x).view(B, self.inter_channels, -1).transpose(1, 2)           # [B, M, inter]
        affinity = torch.softmax(torch.matmul(theta, phi), dim=-1)               # [B, N, M]
        y = torch.matmul(affinity, g).transpose(1, 2).reshape(B, self.inter_channels, *x.shape[2:])
        return x + self.W(y)


def naive_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(1, 2)) * scale, dim=-1), v)


# ------------------------------------------------------------------------------ workloads
class Workload:
    """One provider's timed step: ``no_grad`` = forward under no_grad; ``fwd_bwd`` = forward and
    backward of a fixed upstream gradient (inputs and parameters get gradients)."""

    def __init__(self, case: AttnCase, provider: str, fn, inputs: List[Tensor], module: Optional[nn.Module] = None):
        self.case, self.provider, self.fn, self.inputs, self.module = case, provider, fn, inputs, module
        self.grad_output: Optional[Tensor] = None

    def forward(self) -> Tensor:
        return self.fn(*self.inputs)

    def zero_grad(self):
        for t in self.inputs:
            t.grad = None
        if self.module is not None:
            self.module.zero_grad(set_to_none=True)

    def __call__(self) -> Tensor:
        return timed_step(self, self.forward, self.case.mode == "no_grad")

    def gradients(self) -> Dict[str, Tensor]:
        grads = {f"input{i}": t.grad for i, t in enumerate(self.inputs)}
        if self.module is not None:
            grads.update({f"param{i}": p.grad for i, p in enumerate(self.module.parameters())})
        return grads


def _randomize_block(block: NaiveNonLocal3d, generator: torch.Generator):
    """A trained-looking block: BN γ, β nonzero (at γ = 0 the block is the identity and gradients of
    the attention path vanish, which would make the parity check blind)."""
    with torch.no_grad():
        block.W[1].weight.copy_(torch.rand(block.W[1].weight.shape, generator=generator) + 0.5)
        block.W[1].bias.copy_(torch.randn(block.W[1].bias.shape, generator=generator) * 0.1)


def build(case: AttnCase, device="cpu", seed: int = 0, scale_down: int = 1) -> Dict[str, Workload]:
    """Workloads per provider with equal inputs and weights. ``scale_down`` divides N, M (op) or
    H, W (block) for the subprocess warm-up."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    s = case.shape
    needs_grad = case.mode == "fwd_bwd"
    workloads = {}
    if case.op == "NonlocalAttention":
        N, M = max(1, s.N // scale_down), max(1, s.M // scale_down)
        base = [torch.randn(s.B, rows, s.D, generator=generator) for rows in (N, M, M)]
        scale = 1.0 / math.sqrt(s.D)
        fns = {"native": naive_attention, "sdpa": lambda q, k, v, sc: F.scaled_dot_product_attention(q, k, v, scale=sc),
               "fastvid": fastvid.ops.nonlocal_attention,
               "fastvid_saved": lambda q, k, v, sc: fastvid.ops.nonlocal_attention(q, k, v, sc, save_scores=True)}
        for provider in case.providers:
            # each provider its own leaves (.to of a CPU tensor to the CPU is the tensor itself: shared
            # leaves held one set of gradients, so the parity check compared a provider's with itself)
            inputs = [t.to(device).clone().requires_grad_(needs_grad) for t in base]
            fn = fns[provider]
            workloads[provider] = Workload(case, provider, lambda q, k, v, fn=fn: fn(q, k, v, scale), inputs)
        return workloads
    H, W = max(2, s.H // scale_down), max(2, s.W // scale_down)
    naive = NaiveNonLocal3d(s.C, s.inter)
    _randomize_block(naive, generator)
    naive = naive.to(device).train(needs_grad)
    converted = fastvid.convert(naive)
    if not isinstance(converted, fastvid.nn.NonLocalBlock):
        raise AssertionError(f"{case.name}: fastvid.convert did not recognise the naive nonlocal block")
    x = torch.randn(s.B, s.C, s.T, H, W, generator=generator).to(device)
    for provider, module in (("native", naive), ("fastvid", converted)):
        workloads[provider] = Workload(case, provider, module, [x.clone().requires_grad_(needs_grad)], module)
    return workloads


def check_parity(workloads: Dict[str, Workload]) -> Dict[str, float]:
    """Outputs and (fwd_bwd) every gradient of each provider against the naive one."""
    case = workloads["native"].case
    outputs, states = {}, {}
    for name, w in workloads.items():
        if w.module is not None:
            states[name] = {k: v.clone() for k, v in w.module.state_dict().items()}
        outputs[name] = w()
        if w.module is not None:  # undo the BN running-statistics update of this extra step
            w.module.load_state_dict(states[name])
    errors = {}
    for name in workloads:
        if name == "native":
            continue
        errors[f"{name}_output"] = relative_error(outputs[name], outputs["native"])
        if case.mode == "fwd_bwd":
            # Some gradients are zero in exact arithmetic (biases in front of a softmax or of a
            # training-mode BatchNorm: both cancel constants), so their rounding noise is judged
            # against the largest gradient's norm rather than their own.
            reference = workloads["native"].gradients()
            floor = 1e-2 * max(float(g.detach().double().norm()) for g in reference.values())
            for key, grad in workloads[name].gradients().items():
                diff = float((grad.detach().double() - reference[key].detach().double()).norm())
                errors[f"{name}_grad_{key}"] = diff / max(float(reference[key].detach().double().norm()), floor)
    return assert_within(case.name, errors, PARITY_RTOL[case.op])


# ------------------------------------------------------------------------------ FLOP rate
def attention_flops(shape: AttnShape, mode: str, recompute: bool = True) -> int:
    """GEMM FLOPs of one step: forward S = q kᵀ and O = P v (2·N·M·D each per batch, D = Dv);
    backward dP = dO vᵀ, dV = Pᵀ dO, dK = dSᵀ q, dQ = dS k, plus S again where the backward
    recomputes it (flash style: fastvid, SDPA; not the naive autograd graph, which stores P, nor
    fastvid with save_scores, which stores S). The
    softmax's exp and row sums are O(N·M), not counted."""
    per_product = 2 * shape.B * shape.N * shape.M * shape.D
    return per_product * (2 if mode == "no_grad" else 6 + int(recompute))


def sgemm_rate(depth: int, rounds: int = 10) -> Dict[str, float]:
    """The machine's fp32 GEMM rate in FLOP/s at this process's thread count, on the CPU kernel's tile
    shape (query rows × key rows × ``depth``, the tile from the extension itself): a batched product of 64 such tiles per thread (``torch.bmm``, ~10 ms),
    best and median over ``rounds``. The rows use the best: the rate the cores can reach (on a
    shared machine the median is whatever the neighbours left)."""
    m, n = torch.ops.fastvid._attention_cpu_tile()
    k = depth
    batch = 64 * torch.get_num_threads()
    a, b = torch.randn(batch, m, k), torch.randn(batch, k, n)
    out = torch.empty(batch, m, n)
    torch.bmm(a, b, out=out)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        torch.bmm(a, b, out=out)
        rates.append(2 * batch * m * n * k / (time.perf_counter() - start))
    return {"median": sorted(rates)[len(rates) // 2], "best": max(rates)}


# ------------------------------------------------------------------------------ peak memory (subprocess)
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_here(case: AttnCase, provider: str) -> float:
    """In this (fresh) process: warm up on a tiny input, build the case, reset the RSS high-water
    mark, run one step; returns the high-water mark above the RSS before the step, in MiB."""
    build(case, scale_down=8)[provider]()
    workload = build(case)[provider]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _status_kib("VmRSS")
    workload()
    return (_status_kib("VmHWM") - before) / 1024.0


PEAK_RUNS = 3  # subprocesses per case and provider; the RSS high-water mark varies ±15 % with malloc's state


def peak_memory_mib(case: AttnCase, provider: str, runs: Optional[int] = None) -> Optional[float]:
    """The median over ``runs`` fresh ``python -m fastvid.bench.attention --peak`` subprocesses (this
    process's thread count) of :func:`_peak_here`; None where /proc is unavailable."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    spec = json.dumps({"op": case.op, "shape": case.shape.as_dict(), "mode": case.mode, "dtype": case.dtype})
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    peaks = []
    for _ in range(runs or PEAK_RUNS):
        done = subprocess.run([sys.executable, "-m", "fastvid.bench.attention", "--peak", spec, provider],
                              capture_output=True, text=True, env=env, check=True)
        peaks.append(float(done.stdout.strip().splitlines()[-1]))
    return sorted(peaks)[len(peaks) // 2]


# ------------------------------------------------------------------------------ runner
def run_case(case: AttnCase, rounds: int, warmup: int, device="cpu", memory: bool = True,
             base: Optional[dict] = None) -> List[dict]:
    base = dict(base or {})
    workloads = build(case, device=device)
    with ieee_fp32():
        parity = check_parity(workloads)
    rows: List[dict] = []

    def add(provider, metric, unit, stats, **extra):
        rows.append({"op": case.op, "provider": provider, "mode": case.mode, "metric": metric, "unit": unit,
                     "shape": case.shape.label, **stats, "dtype": case.dtype, **base, "timestamp": results.now(),
                     "shape_dims": case.shape.as_dict(), "layout": "contiguous", **extra})

    times = measure.time_interleaved(dict(workloads), rounds=rounds, warmup=warmup, device=device)
    flop_rate = {}
    if case.op == "NonlocalAttention" and torch.device(device).type == "cpu":
        sgemm = sgemm_rate(case.shape.D)["best"]
        for provider in case.providers:
            flops = attention_flops(case.shape, case.mode, recompute=provider not in ("native", "fastvid_saved"))
            rate = flops / measure.summarize(times[provider].wall)["median"]
            flop_rate[provider] = dict(gflop_per_s=rate / 1e9, sgemm_gflop_per_s=sgemm / 1e9,
                                       fraction_of_sgemm=rate / sgemm)
    if case.op == "NonlocalAttention" and case.dtype == "fp32" and torch.device(device).type == "cpu":
        # The least time of any implementation: the products without recomputing q kᵀ (the naive
        # provider's count) at the FMA peak; the operands' bytes at the copy bandwidth.
        sh = case.shape
        operands = sh.B * (2 * sh.N * sh.D + 2 * sh.M * sh.D) * 4  # q, out; k, v (fp32)
        copy_bps, fma_per_s = 1e9 * depthwise.copy_bandwidth(device)["median"], ceiling.fma_peak()
        least = ceiling.least_seconds(operands * (1 if case.mode == "no_grad" else 3),
                                      attention_flops(sh, case.mode, recompute=False) / 2, copy_bps, fma_per_s)
        for provider in ("native", "sdpa"):  # each baseline's time, against the one least time
            if provider in case.providers:
                add(provider, "ceiling", "ms", {k: v * 1e3 for k, v in measure.summarize(times[provider].wall).items()})
        add("bound", "ceiling", "ms", ceiling.bound_fields(least, fma_G_per_s=fma_per_s / 1e9))
    for provider in case.providers:
        stats = measure.summarize(times[provider].wall)
        add(provider, "time", "ms", {k: v * 1e3 for k, v in stats.items()}, rounds=len(times[provider].wall),
            **flop_rate.get(provider, {}),
            parity_max_rel_error=max(parity.values()),
            minor_faults_per_call=sorted(times[provider].minor_faults)[len(times[provider].minor_faults) // 2],
            sys_ms_per_call=1e3 * sorted(times[provider].sys_seconds)[len(times[provider].sys_seconds) // 2])
    if memory and case.mode == "fwd_bwd":
        # What the tensors need, free of allocator effects: the allocation-level peak of one step.
        for provider in case.providers:
            workloads[provider].zero_grad()
            peak = measure.peak_memory_bytes(workloads[provider], device=device) / 2.0 ** 20
            add(provider, "peak_allocated", "MiB", {"median": peak, "p20": peak, "p80": peak},
                note="peak bytes allocated by tensors during one step (profiler), above those live before it")
    if memory and case.mode == "fwd_bwd" and torch.device(device).type == "cpu":
        del workloads
        for provider in case.providers:
            peak = peak_memory_mib(case, provider)
            if peak is not None:
                add(provider, "peak_memory", "MiB", {"median": peak, "p20": peak, "p80": peak},
                    note="RSS high-water mark of one step in a fresh subprocess, above the RSS before the step",
                    budget_MiB=MEMORY_BUDGET_MIB, fits_budget=peak <= MEMORY_BUDGET_MIB)
    return rows


def _main(argv: List[str]) -> int:
    if len(argv) == 3 and argv[0] == "--peak":
        spec = json.loads(argv[1])
        case = AttnCase(spec["op"], AttnShape(**spec["shape"]), spec["mode"], spec["dtype"])
        print(f"{_peak_here(case, argv[2]):.3f}")
        return 0
    print("usage: python -m fastvid.bench.attention --peak CASE_JSON PROVIDER", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
