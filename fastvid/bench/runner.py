"""The benchmark runner behind ``python -m fastvid bench``.

For every case (fastvid/bench/cases.py): build the native and the fastvid workload with equal
weights, assert they agree (outputs and gradients), time them interleaved, then measure peak
memory (forward+backward cases) and dispatched ops per step (no-grad cases) — see measure.py
for how. Rows go to the results file and the table of the run is printed.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

import fastvid

from . import cases as cases_mod
from . import attention, depthwise, emulate, measure, report, results

#: Rounds and warm-up calls per provider and case.
FULL_ROUNDS, FULL_WARMUP = 10, 2
QUICK_ROUNDS, QUICK_WARMUP = 7, 1
#: --quick: seconds of timed calls per case after which fewer rounds suffice (measure.time_budget_seconds).
QUICK_TIME_BUDGET_S = 10.0

#: With wait_idle: how often a case is measured at most while other processes disturb it.
MAX_ATTEMPTS = 3

MIB = 2.0 ** 20


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_case(case: cases_mod.Case, rounds: int, warmup: int, device="cpu", memory: bool = True,
             ops: bool = True, base: Optional[dict] = None) -> List[dict]:
    """Measure one case; returns its result rows (both providers). Raises AssertionError when
    fastvid and native disagree."""
    base = dict(base or {})
    workloads = cases_mod.build(case, device=device)
    parity = {}

    def first_call():  # the first fastvid call makes (and caches) the auto strategy choice
        with cases_mod.ieee_fp32():
            parity.update(cases_mod.check_parity(workloads))

    strategy = cases_mod.strategy_of(first_call)
    rows: List[dict] = []

    def add(provider, metric, unit, stats, **extra):
        rows.append({
            "op": case.op, "provider": provider, "mode": case.mode, "metric": metric, "unit": unit,
            "shape": case.shape.label, **stats, "dtype": case.dtype, **base,
            "timestamp": results.now(), "shape_dims": case.shape.as_dict(),
            "layout": "channels_last" if case.channels_last else "contiguous", **extra,
        })

    fns = {name: workloads[name] for name in cases_mod.PROVIDERS}
    times = measure.time_interleaved(fns, rounds=rounds, warmup=warmup, device=device)
    for provider in cases_mod.PROVIDERS:
        timing = times[provider]
        stats = {k: v * 1e3 for k, v in measure.summarize(timing.wall).items()}
        extra = {"rounds": len(timing.wall), "parity_max_rel_error": max(parity.values()),
                 "minor_faults_per_call": statistics.median(timing.minor_faults),
                 "sys_ms_per_call": 1e3 * statistics.median(timing.sys_seconds)}
        if provider == "fastvid":
            extra["strategy"] = strategy
        add(provider, "time", "ms", stats, **extra)

    if memory and case.mode == "fwd_bwd":
        for provider in cases_mod.PROVIDERS:
            workloads[provider].zero_grad()  # free the last call's gradients before measuring
            peak = measure.peak_memory_bytes(workloads[provider], device=device) / MIB
            add(provider, "peak_memory", "MiB", {"median": peak, "p20": peak, "p80": peak})

    if case.mode == "no_grad" and case.dtype == "fp32" and torch.device(device).type == "cpu":
        flop_rate_rows(case, times["native"], rounds, warmup, add)

    if ops and case.mode == "no_grad" and torch.device(device).type == "cpu":
        for provider in cases_mod.PROVIDERS:
            counts = measure.count_dispatched_ops(workloads[provider])
            T = case.shape.T
            for metric, key in (("ops_per_step", "top_level"), ("nested_ops_per_step", "nested")):
                value = counts[key] / T
                add(provider, metric, "ops/step", {"median": value, "p20": value, "p80": value},
                    ops={name: n for name, n in sorted(counts[key + "_ops"].items())})
    return rows


def conv_flops(case: cases_mod.Case) -> int:
    """FLOPs of the direct 3x3 convolutions of one sequence forward (input and hidden conv of every
    step, 2 per multiply-add): what native computes, whichever algorithm runs them."""
    s = case.shape
    gates = 4 if case.op == "ConvLSTM" else 3
    return 2 * s.B * s.T * s.H * s.W * s.kernel_size ** 2 * (s.C_in + s.C) * gates * s.C


_gemm_rate: dict = {}


def gemm_gflops(size: int = 1024, rounds: int = 5) -> float:
    """This machine's fp32 GEMM rate (torch.mm of two size x size matrices, median of `rounds`), measured
    once per process and ISA-independent (torch's BLAS)."""
    if size not in _gemm_rate:
        a, b = torch.randn(size, size), torch.randn(size, size)
        timing = measure.time_interleaved({"mm": lambda: torch.mm(a, b)}, rounds=rounds, warmup=1)["mm"]
        _gemm_rate[size] = 2 * size ** 3 / statistics.median(timing.wall) / 1e9
    return _gemm_rate[size]


def flop_rate_rows(case: cases_mod.Case, native_timing, rounds: int, warmup: int, add) -> None:
    """conv_gflops_<path> rows: the direct-conv FLOPs of the forward / its median time, for native and
    fastvid's oneDNN ('hoisted') and Winograd paths (provider 'conv_rate', whichever path it is), each next to
    the machine's GEMM rate ('gemm' provider, the native column). The time includes the gate math, so these
    are lower bounds of the conv part's rate. Native's time is its time in the case's interleaved timing;
    fastvid's two paths are timed here, each alone, back to back."""
    flops = conv_flops(case)
    gemm = gemm_gflops()
    paths = {"native": statistics.median(native_timing.wall)}
    for label, strategy in (("onednn", "hoisted"), ("winograd", "winograd")):
        workload = cases_mod.build(case, strategy=strategy)["fastvid"]
        timing = measure.time_interleaved({label: workload}, rounds=rounds, warmup=warmup)[label]
        paths[label] = statistics.median(timing.wall)
    for label, seconds in paths.items():
        metric = f"conv_gflops_{label}"
        add("gemm", metric, "GFLOP/s", {"median": gemm, "p20": gemm, "p80": gemm})
        rate = flops / seconds / 1e9
        add("conv_rate", metric, "GFLOP/s", {"median": rate, "p20": rate, "p80": rate})


def cpu_isa_paths(device="cpu") -> List[Optional[str]]:
    """The CPU ISA paths (csrc/cpu_isa.h) this machine can run, best first; [None] off the CPU or
    without the compiled kernels (nothing to force)."""
    info = fastvid.info()
    if torch.device(device).type != "cpu" or not info["cpu_kernels"]:
        return [None]
    return list(reversed(info["cpu_isa_supported"]))


@contextlib.contextmanager
def forced_cpu_isa(isa: Optional[str]):
    """Runs the block with fastvid's CPU kernels on path ``isa`` (None: leave it)."""
    if isa is None:
        yield
        return
    ops = torch.ops.fastvid
    previous = ops._cpu_isa()
    ops._set_cpu_isa(isa)
    try:
        yield
    finally:
        ops._set_cpu_isa(previous)


def bf16_native(device="cpu") -> bool:
    """Whether the device does bf16 arithmetic natively (CPU: AVX512-BF16; without it PyTorch
    emulates bf16 convolutions and GEMMs in fp32 with conversions: slow, and not what a user with
    such a CPU would run)."""
    if torch.device(device).type != "cpu":
        return True
    return bool(fastvid.info().get("cpu_isa_bf16"))


def run(cases: Iterable[cases_mod.Case], rounds: int, warmup: int, out: Optional[str] = results.DEFAULT_PATH,
        device="cpu", memory: bool = True, ops: bool = True, wait_idle: float = 0.0, extra: Optional[dict] = None,
        log: Callable[[str], None] = _log, isas: Optional[Sequence[Optional[str]]] = None,
        isas_of: Optional[Callable[[object], Sequence[Optional[str]]]] = None) -> Tuple[List[dict], List[str]]:
    """Run the cases; append each case's rows to ``out`` as soon as it is measured (None: don't
    save). Returns ``(rows, failures)``: cases whose parity check fails are not timed, and
    their messages are returned in ``failures``. ``wait_idle``: before each case, wait up to that
    many seconds for other processes to leave the cores alone (see measure.OtherLoad), and measure
    a case again (at most MAX_ATTEMPTS times in all) when they did not meanwhile. ``extra``:
    fields added to every row (e.g. ``{"malloc": "keep"}``). ``isas``: the CPU ISA paths to measure
    every case under (default: all the machine supports, :func:`cpu_isa_paths`); each row records
    its path in ``isa`` (native rows too: native is timed again next to each path, same run); paths below
    the machine's best run in a child process with native PyTorch limited to the same ISA (emulate.py).
    ``isas_of(case)``: the paths for one case instead (a subset per case, e.g. for a time budget)."""
    cases = list(cases)
    isas = list(isas) if isas is not None else cpu_isa_paths(device)
    info = fastvid.info()
    base = {"machine": results.machine(device), "device": str(device), "threads": torch.get_num_threads(),
            "version": fastvid.__version__, "torch": torch.__version__, "run_id": results.new_run_id(),
            "malloc": "default", "cpu_isa_supported": ",".join(info["cpu_isa_supported"]),
            "cpu_isa_bf16": info["cpu_isa_bf16"], "cpu_l2_bytes": info["cpu_l2_bytes"],
            "cpu_last_level_cache_bytes": info["cpu_last_level_cache_bytes"], **(extra or {})}
    work = [(case, isa) for case in cases for isa in (isas_of(case) if isas_of else isas)]
    log(f"fastvid bench: {len(cases)} cases on ISA paths {isas} ({len(work)} measurements), {rounds} rounds after "
        f"{warmup} warm-up call(s), torch.get_num_threads() = {base['threads']}, {base['machine']}, "
        f"malloc {base['malloc']}")
    all_rows: List[dict] = []
    failures = []
    # Paths below the machine's best: measured in a child process that limits native PyTorch too (emulate.py).
    best = cpu_isa_paths(device)[0]
    emulated = [] if emulate.in_child() else [isa for isa in dict.fromkeys(isa for _, isa in work)
                                              if isa is not None and isa != best]
    work = [(case, isa) for case, isa in work if isa not in emulated]
    start = time.perf_counter()
    for number, (case, isa) in enumerate(work, 1):
        case_start = time.perf_counter()
        label = case.name if isa is None else f"{case.name} [{isa}]"
        strategy = ""  # auto choice seen in the first attempt (later attempts find it cached)
        try:
            for attempt in range(1, (MAX_ATTEMPTS if wait_idle > 0 else 1) + 1):
                if wait_idle > 0:
                    measure.wait_until_idle(wait_idle, threshold=report.BUSY_CORES, log=log)
                with measure.OtherLoad() as load, forced_cpu_isa(isa):
                    if isinstance(case, depthwise.DWCase):
                        rows = depthwise.run_case(case, rounds, warmup, device, memory, base)
                    elif isinstance(case, attention.AttnCase):
                        # Its peak memory (fresh subprocesses, seconds each) does not depend on the
                        # ISA path: measured under the case's first path only (never in an emulating child).
                        first = (isas_of(case) if isas_of else isas)[0]
                        rows = attention.run_case(case, rounds, warmup, device,
                                                  memory and isa == first and not emulate.in_child(), base)
                    else:
                        rows = run_case(case, rounds, warmup, device, memory, ops, base)
                for row in rows:
                    if "strategy" in row:
                        strategy = row["strategy"] = row["strategy"] or strategy
                if wait_idle <= 0 or load.cores is None or load.cores <= report.BUSY_CORES:
                    break
                if attempt < MAX_ATTEMPTS:
                    log(f"  {label}: other processes used {load.cores:.1f} cores meanwhile; measuring again")
        except AssertionError as exc:
            failures.append(str(exc))
            log(f"[{number}/{len(work)}] {label}: PARITY FAILURE, not timed: {exc}")
            continue
        for row in rows:
            row["other_load"] = None if load.cores is None else round(load.cores, 2)
            row["isa"] = isa
        if out:
            results.append(out, rows)
        all_rows.extend(rows)
        timed = {r["provider"]: r for r in rows if r["metric"] == "time"}
        bandwidth = [r for r in rows if r["metric"] == "bandwidth" and r["provider"] == "fastvid"]
        log(f"[{number}/{len(work)}] {label}: "
            + ", ".join(f"{p} {r['median']:.1f} ms (sys {r['sys_ms_per_call']:.1f} ms, "
                        f"{r['minor_faults_per_call']:.0f} page faults)" for p, r in timed.items())
            + "".join(f", fastvid forward {r['median']:.1f} GB/s = {r['fraction_of_copy']:.0%} of copy "
                      f"{r['copy_GBps']:.1f} GB/s ({r['calls_without_page_faults']} of {r['calls_timed']} calls "
                      f"without page faults; every call: {r['every_call_fraction_of_copy']:.0%})" for r in bandwidth)
            + f" ({time.perf_counter() - case_start:.0f} s"
            + ("" if load.cores is None else f", other processes used {load.cores:.1f} cores") + ")")
    for isa in emulated:
        subset = [case for case in cases if isa in (isas_of(case) if isas_of else isas)]
        log(f"fastvid bench: {len(subset)} cases on the {isa} path in a child process with native PyTorch limited "
            f"likewise ({emulate.describe(isa)})")
        rows, child_failures = emulate.run_in_child(isa, subset, rounds, warmup, str(device), memory, ops, wait_idle,
                                                    extra)
        for row in rows:  # one run of this machine; the child's own view of the CPU kept aside
            row["emulated_cpu_isa_supported"] = row["cpu_isa_supported"]
            row.update(base)
        if out:
            results.append(out, rows)
        all_rows.extend(rows)
        failures.extend(child_failures)
    log(f"fastvid bench: done in {time.perf_counter() - start:.0f} s" + (f", rows appended to {out}" if out else ""))
    return all_rows, failures
