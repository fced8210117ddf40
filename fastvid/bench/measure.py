"""How things are measured: wall time, peak memory, dispatched ops per time step.

Time
    Every provider of a case runs in the same process with the same thread count. Each gets
    ``warmup`` untimed calls (the first fastvid call also times its two strategies once and
    caches the faster, like ``cudnn.benchmark``), then the providers are timed in *interleaved*
    rounds in a fixed cycle (native, fastvid, native, fastvid, ...) so that a change in machine
    load during the run hits both alike, and every timed call follows another provider's call,
    as a layer's call follows other layers' in a model: each provider meets the same cache state
    in every round (with more than two providers, as the attention and X3D cases have, each follows
    its own predecessor in the cycle, the same one every round). (Alternating the order each round
    gave each provider half its calls right after its own, with its data still in cache, and half
    after the other's, which had evicted it: a two-mode distribution whose median flipped between
    runs, e.g. 1.3 vs 1.6 ms for the NCDHW depthwise forward.) One round = one call, timed with ``time.perf_counter`` (CUDA: with a
    synchronize before and after). The garbage collector is off while timing. Reported:
    median and the 20th/80th percentiles over the rounds, plus the median minor page faults and
    system CPU time per call (glibc malloc unmaps big freed blocks, so code that allocates big
    temporaries every call spends system time faulting their pages back in; see
    :func:`keep_freed_memory`), and how many cores other processes used meanwhile
    (:class:`OtherLoad`): on a 2-core machine a busy neighbour ruins timings.

Peak memory
    Peak of tensor memory allocated *during* one forward+backward call, above what was
    allocated when the call began (inputs and weights excluded, gradients included). On CPU it
    is read from ``torch.profiler`` with ``profile_memory=True``: every allocation and free of
    the CPU allocator is an event with a signed byte count; the peak is the maximum of their
    running sum in time order. This counts what the ops ask for, independent of how glibc
    malloc caches or returns pages. (The process RSS high-water mark was tried and rejected:
    after a warm-up call glibc serves the measured call from memory it kept, so VmHWM, even
    reset through /proc/self/clear_refs, moved by 0-8 MiB for calls whose tensors peak at
    40-80 MiB.) Allocations that bypass PyTorch's allocator (e.g. oneDNN scratch pads) are not
    counted, for either provider. On CUDA:
    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

Dispatched ops per time step
    One forward (no_grad, one layer) under ``torch.profiler``. An event counts when it is a
    compute op (``aten::*`` or ``fastvid::*``, not a pure view/metadata op such as ``view``,
    ``select``, ``chunk``, ``empty``) and none of its ancestors is one — the ops the framework
    dispatches on behalf of the model code, i.e. the kernel launches a GPU would see from
    Python. ``contiguous``/``to`` wrappers are transparent (the copy they may dispatch
    counts). The total is divided by T. Also reported, as ``nested_ops_per_step``: compute ops
    at any depth that have no compute-op descendant (the innermost dispatched ops, including the
    convolutions fastvid's C++ time loop dispatches; fastvid's fused gate kernels run inline in
    its sequence op and are not separate dispatcher calls, so they do not appear).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import resource
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

#: Pure view / metadata / allocation ops: no kernel, not counted.
VIEW_OPS = frozenset("""
view view_as reshape _reshape_alias _unsafe_view select slice split split_with_sizes chunk unbind narrow
as_strided unsqueeze squeeze transpose permute t expand expand_as empty empty_like empty_strided
new_empty new_empty_strided detach alias lift_fresh resolve_conj resolve_neg flatten unflatten
movedim set_ resize_ resize_as_ _resize_output_ as_strided_ result_type
""".split())

#: Wrappers that dispatch nothing themselves when there is nothing to do: not counted, but a
#: copy they dispatch is (``contiguous`` -> ``clone``/``copy_``, ``to`` -> ``_to_copy``).
TRANSPARENT_OPS = frozenset("contiguous to type_as _autocast_to_reduced_precision _autocast_to_full_precision"
                            .split())


# ------------------------------------------------------------------------------ time
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Timings:
    """Per-call samples of one provider: wall seconds, and what the OS saw during each call —
    minor page faults and system CPU seconds (first touches of freshly mapped memory: glibc
    malloc serves big blocks with mmap and unmaps them on free, so every call that allocates
    them faults their pages in again)."""
    wall: List[float] = dataclasses.field(default_factory=list)
    minor_faults: List[int] = dataclasses.field(default_factory=list)
    sys_seconds: List[float] = dataclasses.field(default_factory=list)


#: When set (``bench --quick``: a 5-minute budget), time_interleaved stops after the first round that
#: ends past this many seconds of timed calls, once it has MIN_ROUNDS rounds: a native call of seconds
#: (e.g. oneDNN's GEMM-based depthwise weight gradient on an AVX2 CPU) then costs 3 rounds, not 7.
time_budget_seconds: Optional[float] = None
MIN_ROUNDS = 3


def time_interleaved(fns: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                     device="cpu") -> Dict[str, Timings]:
    """Time each function: ``warmup`` untimed calls each, then ``rounds`` timed calls each,
    interleaved in a fixed cycle (fewer past ``time_budget_seconds``)."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    names = list(fns)
    timings = {name: Timings() for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names:
                _sync(device)
                before = resource.getrusage(resource.RUSAGE_SELF)
                start = time.perf_counter()
                fns[name]()
                _sync(device)
                wall = time.perf_counter() - start
                after = resource.getrusage(resource.RUSAGE_SELF)
                timings[name].wall.append(wall)
                timings[name].minor_faults.append(after.ru_minflt - before.ru_minflt)
                timings[name].sys_seconds.append(after.ru_stime - before.ru_stime)
            spent = sum(sum(t.wall) for t in timings.values())
            if time_budget_seconds is not None and r + 1 >= MIN_ROUNDS and spent > time_budget_seconds:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """``{'median', 'p20', 'p80'}`` (linear interpolation between order statistics)."""
    values = sorted(values)
    if len(values) == 1:
        return {"median": values[0], "p20": values[0], "p80": values[0]}
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "p20": deciles[1], "p80": deciles[7]}


# ------------------------------------------------------------------------------ profiler helpers
@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop and 'no GPU' lines straight to fd 2; hide them (errors of the
    profiled code still raise as exceptions)."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (embedded interpreter): nothing to hide
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _profile(fn: Callable[[], object], profile_memory: bool = False):
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=profile_memory) as prof:
        fn()
    return prof


# ------------------------------------------------------------------------------ memory
def peak_memory_bytes(fn: Callable[[], object], device="cpu") -> int:
    """Peak bytes allocated during ``fn()`` above the amount allocated when it started."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    prof = _profile(fn, profile_memory=True)
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak


# ------------------------------------------------------------------------------ op counts
def _short_name(name: str) -> str:
    return name.split("::", 1)[1] if "::" in name else name


def _is_compute(name: str) -> bool:
    if not (name.startswith("aten::") or name.startswith("fastvid::")):
        return False
    short = _short_name(name)
    return short not in VIEW_OPS and short not in TRANSPARENT_OPS


def count_dispatched_ops(fn: Callable[[], object]) -> Dict[str, object]:
    """Profile one call of ``fn`` and count compute ops: ``top_level`` (no compute-op
    ancestor) and ``nested`` (no compute-op descendant), plus per-name tallies of each."""
    prof = _profile(fn)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]

    top: Dict[str, int] = {}
    nested: Dict[str, int] = {}

    def visit(event, under_compute: bool) -> bool:
        """Walk the subtree; tally; return whether it contains a compute op."""
        compute = _is_compute(event.name)
        if compute and not under_compute:
            top[event.name] = top.get(event.name, 0) + 1
        below = False
        for child in event.cpu_children:
            below |= visit(child, under_compute or compute)
        if compute and not below:
            nested[event.name] = nested.get(event.name, 0) + 1
        return compute or below

    for event in events:
        if event.cpu_parent is None:
            visit(event, False)
    return {"top_level": sum(top.values()), "nested": sum(nested.values()), "top_level_ops": top,
            "nested_ops": nested}


# ------------------------------------------------------------------------------ allocator
def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the OS: serve
    every block from the heap (``M_MMAP_MAX = 0``), never trim it (``M_TRIM_THRESHOLD``), and grow
    heaps 1 GiB at a time (``M_TOP_PAD``; without it the OpenMP threads' heaps still hand pages back,
    and e.g. native's NCDHW depthwise forward kept paying ~9,400 page faults per call).

    By default glibc serves blocks above a (dynamic, at most 32 MiB) threshold with ``mmap``
    and unmaps them on free, so code that allocates big temporaries every call pays a page
    fault per 4 KiB page on every call (system time, not compute). Comparing a run with and
    without this setting separates that allocator cost from the kernels' cost. Returns False
    where it cannot be applied (not glibc)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    return (bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 62))
            and bool(libc.mallopt(M_TOP_PAD, 2 ** 30)))


# ------------------------------------------------------------------------------ machine load
def _busy_cpu_seconds() -> Optional[float]:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """``with OtherLoad() as load: ...`` then ``load.cores``: how many cores *other* processes
    kept busy meanwhile (machine-wide busy time minus this process's CPU time, per second of
    wall time; None where /proc/stat is unavailable). With 2 cores and 2 OpenMP threads, even one
    busy neighbour distorts timings badly: every parallel region waits for a descheduled thread,
    which penalises code that runs many small ops (the native loop) far more than fused code."""
    cores: Optional[float] = None

    def __enter__(self):
        self._busy, self._own, self._wall = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy = _busy_cpu_seconds()
        wall = time.perf_counter() - self._wall
        if busy is not None and self._busy is not None and wall > 0:
            others = (busy - self._busy) - (_own_cpu_seconds() - self._own)
            self.cores = max(0.0, others / wall)
        return False


def wait_until_idle(timeout: float, threshold: float = 0.25, sample: float = 1.0,
                    log: Callable[[str], None] = lambda message: None) -> Optional[float]:
    """Wait (at most ``timeout`` seconds) until other processes use fewer than ``threshold``
    cores over a ``sample``-second window; returns the last reading (None: cannot tell)."""
    deadline = time.perf_counter() + timeout
    announced = False
    while True:
        with OtherLoad() as load:
            time.sleep(sample)
        if load.cores is None or load.cores < threshold or time.perf_counter() >= deadline:
            return load.cores
        if not announced:
            log(f"  waiting up to {timeout:.0f} s for an idle machine (other processes use {load.cores:.1f} cores)")
            announced = True


def _own_cpu_seconds() -> float:
    """CPU time of this process and its finished children (the peak-memory subprocesses are ours)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
