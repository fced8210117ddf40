"""Turn result rows into the comparison table: native vs fastvid, ratio, target, PASS/MISS.

``python -m fastvid bench --report FILE`` prints the table of a results file; the runner prints
the same table for the rows it has just measured.

Targets (2-core CPU, same run; the newest issue's value where a later issue raised or lowered one):

* fp32 no-grad forward time: native/fastvid >= 1.8 (issue 12; issue 2 asked 1.3)
* fp32 forward+backward time: native/fastvid >= 1.5 (issue 12; issue 2 asked 1.3)
* bf16 autocast forward+backward time: native/fastvid >= 2
* dispatched compute ops per time step, forward, one layer: fastvid <= 2 (applied to both
  counts, the top-level one and the nested one; see measure.py)
* peak memory of forward+backward: fastvid <= 0.8 x native

Depthwise targets (vs ``nn.Conv3d(groups=C)``, both layouts, each ISA path; issue 11, which replaced
issue 3's forward x5 by x3 plus a bandwidth fraction and raised the X3D block from x2):

* DepthwiseConv3d fp32 forward (no_grad): native/fastvid >= 3; forward+backward: >= 10
* X3DBlock (X3D-style bottleneck, converted vs native) forward+backward: >= 2.5
* ``bandwidth`` rows (fastvid depthwise forward): achieved GB/s in the fastvid column, the
  machine's copy bandwidth of the same run in the native column (provider ``copy``), ratio =
  fastvid / copy (the fraction of copy bandwidth reached): >= 0.5.

``ceiling`` rows (fastvid/bench/ceiling.py; depthwise, X3D block and attention op, fp32 on the CPU)
carry their time row's target and say whether any implementation could meet it in this run
(``reachable`` / ``target > ceiling``); a time row's MISS above its ceiling is marked ``(bound)``.

Nonlocal attention targets (issue 4; native = the naive ``softmax(q kᵀ) v`` / naive block):

* NonlocalAttention at N >= 6272: forward >= 2x naive, forward+backward >= 1.5x naive; and
  ``NonlocalAttention vs SDPA`` (provider ``sdpa`` in the native column): >= 1.0x, and (issue 11)
  forward+backward >= 1.25x at N >= 6272; the same targets for ``NonlocalAttention save_scores vs
  SDPA`` (provider ``fastvid_saved`` in the fastvid column: the op with ``save_scores=True``)
* NonLocalBlock at (8,28,28): forward+backward >= 1.3x; peak memory <= 1/2 of naive there and
  <= 1/4 at (16,28,28)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

#: Cores used by other processes (measure.OtherLoad) above which the table warns.
BUSY_CORES = 0.25
#: A time row's result notes native's system CPU time where it is this share of its median call or more.
NATIVE_SYS_SHOWN = 0.1

#: Metric order within a case group, and how each is printed.
METRICS = ("time", "ceiling", "bandwidth", "peak_memory", "peak_allocated", "ops_per_step", "nested_ops_per_step")
_FORMAT = {"time": "{:.1f} ms", "ceiling": "{:.1f} ms", "bandwidth": "{:.1f} GB/s", "peak_memory": "{:.1f} MiB", "peak_allocated": "{:.1f} MiB",
           "ops_per_step": "{:.2f}", "nested_ops_per_step": "{:.2f}"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal for one metric. ``passes(native, fastvid)``; ``label`` is printed; ``shortfall``
    is how many times better fastvid's number must get to pass (1 when it passes)."""
    label: str
    passes: Callable[[float, float], bool]
    shortfall: Callable[[float, float], float]


def _speedup(minimum: float) -> Target:
    return Target(f"x{minimum:g} faster", lambda n, f: n / f >= minimum, lambda n, f: max(1.0, minimum * f / n))


_OPS_TARGET = Target("<= 2/step", lambda n, f: f <= 2.0, lambda n, f: max(1.0, f / 2.0))
_MEMORY_TARGET = Target("<= 0.8x native", lambda n, f: f <= 0.8 * n, lambda n, f: max(1.0, f / (0.8 * n)))


#: Recurrent fp32 time targets per mode (issue 12).
RECURRENT_FP32_TIME_TARGETS = {"no_grad": 1.8, "fwd_bwd": 1.5}

#: Time targets of the depthwise ops (issue 11), per (op, mode); fp32 and bf16 alike.
DEPTHWISE_TIME_TARGETS = {("DepthwiseConv3d", "no_grad"): 3.0, ("DepthwiseConv3d", "fwd_bwd"): 10.0,
                          ("X3DBlock", "fwd_bwd"): 2.5}
#: The depthwise forward's fraction of the run's copy bandwidth (issue 11).
DEPTHWISE_BANDWIDTH_FRACTION = 0.5
DEPTHWISE_OPS = ("DepthwiseConv3d", "X3DBlock")


def _memory_fraction(fraction: float) -> Target:
    return Target(f"<= {fraction:g}x native", lambda n, f: f <= fraction * n, lambda n, f: max(1.0, f / (fraction * n)))


def _bandwidth_fraction(fraction: float) -> Target:
    """fastvid's achieved bandwidth (fastvid column) >= fraction x the copy bandwidth (native column)."""
    return Target(f">= {fraction:.0%} copy", lambda n, f: f >= fraction * n, lambda n, f: max(1.0, fraction * n / f))


SDPA_SUFFIX = " vs SDPA"
SAVED_SCORES_SUFFIX = " save_scores vs SDPA"
ATTENTION_OPS = ("NonlocalAttention", "NonlocalAttention" + SDPA_SUFFIX, "NonlocalAttention" + SAVED_SCORES_SUFFIX,
                 "NonLocalBlock")


def _attention_target(metric: str, mode: str, op: str, dims: dict) -> Optional[Target]:
    if op == "NonlocalAttention" and metric == "time" and dims.get("N", 0) >= 6272:
        return _speedup(2.0 if mode == "no_grad" else 1.5)
    if op in ("NonlocalAttention" + SDPA_SUFFIX, "NonlocalAttention" + SAVED_SCORES_SUFFIX) and metric == "time":
        # issue 11: a margin at N >= 6272
        return _speedup(1.25 if mode == "fwd_bwd" and dims.get("N", 0) >= 6272 else 1.0)
    if op == "NonLocalBlock":
        thw = (dims.get("T"), dims.get("H"), dims.get("W"))
        if metric == "time" and mode == "fwd_bwd" and thw == (8, 28, 28):
            return _speedup(1.3)
        if metric == "peak_memory" and thw in ((8, 28, 28), (16, 28, 28)):
            return _memory_fraction(0.5 if thw == (8, 28, 28) else 0.25)
    return None


def target_for(metric: str, mode: str, dtype: str, op: Optional[str] = None,
               dims: Optional[dict] = None) -> Optional[Target]:
    """The issue's target for a (metric, mode, dtype) row of ``op`` (shape ``dims``), or None.
    A ``ceiling`` row carries its time row's target."""
    if metric == "ceiling":
        metric = "time"
    if op in ATTENTION_OPS:
        return _attention_target(metric, mode, op, dims or {})
    if op in DEPTHWISE_OPS:
        if metric == "bandwidth":
            return _bandwidth_fraction(DEPTHWISE_BANDWIDTH_FRACTION)
        minimum = DEPTHWISE_TIME_TARGETS.get((op, mode)) if metric == "time" else None
        return None if minimum is None else _speedup(minimum)
    if metric == "time":
        if dtype == "fp32":
            return _speedup(RECURRENT_FP32_TIME_TARGETS[mode])
        if dtype == "bf16" and mode == "fwd_bwd":
            return _speedup(2.0)
        return None
    if metric in ("ops_per_step", "nested_ops_per_step"):
        return _OPS_TARGET
    if metric == "peak_memory":
        return _MEMORY_TARGET
    return None


@dataclasses.dataclass
class Comparison:
    """One table row: a (op, shape, dtype, mode, metric) with both providers' rows."""
    op: str
    shape: str
    dtype: str
    mode: str
    metric: str
    isa: Optional[str] = None  # fastvid's CPU ISA path (None: not recorded / not a CPU run)
    native: Optional[dict] = None
    fastvid: Optional[dict] = None
    ceiling: Optional["Comparison"] = None  # time rows: the same case's ceiling row, where measured
    timed: Optional["Comparison"] = None  # ceiling rows: the same case's time row

    @property
    def ratio(self) -> Optional[float]:
        """native / fastvid: > 1 means fastvid is faster / smaller / dispatches fewer ops.
        ``bandwidth`` rows: fastvid / copy, the fraction of the copy bandwidth reached."""
        if not (self.native and self.fastvid) or not self.fastvid["median"]:
            return None
        if _is_limit_metric(self.metric):
            return self.fastvid["median"] / self.native["median"] if self.native["median"] else None
        return self.native["median"] / self.fastvid["median"]

    @property
    def bf16_emulated(self) -> bool:
        """A bf16 row measured where native bf16 arithmetic is emulated: a CPU without AVX512-BF16,
        or a path below AVX-512 (the emulated AVX2 CPU limits native PyTorch to AVX2)."""
        row = self.fastvid or self.native or {}
        return self.dtype.startswith("bf16") and (row.get("cpu_isa_bf16") is False
                                                   or self.isa not in (None, "avx512"))

    @property
    def target(self) -> Optional[Target]:
        if self.metric == "time" and self.bf16_emulated:
            return None  # issue 12's bf16 speed target holds where the CPU has native bf16 arithmetic
        dims = (self.fastvid or self.native or {}).get("shape_dims")
        return target_for(self.metric, self.mode, self.dtype, self.op, dims)

    @property
    def status(self) -> str:
        """'PASS', 'MISS x<factor>' (fastvid's number must get that many times better), or '-'."""
        target = self.target
        if target is None or not (self.native and self.fastvid):
            return "-"
        n, f = self.native["median"], self.fastvid["median"]
        if self.metric == "ceiling":  # fastvid column = the least time: can any kernel meet the target?
            verdict = "reachable" if target.passes(n, f) else f"target > ceiling x{target.shortfall(n, f):.2f}"
            ours = (self.timed.fastvid or {}).get("median") if self.timed else None
            return verdict + (f", fastvid at {f / ours:.0%}" if ours else "")
        if target.passes(n, f):
            return "PASS"
        return f"MISS x{target.shortfall(n, f):.2f}" + (" (bound)" if self.above_ceiling else "")

    @property
    def above_ceiling(self) -> bool:
        """A time row whose target lies above this run's ceiling for it (no kernel could meet it)."""
        return self.ceiling is not None and self.ceiling.status.startswith("target > ceiling")

    @property
    def native_sys_ms(self) -> Optional[float]:
        """Time rows against native (not SDPA): the system CPU time of native's median call (all threads; mostly
        page faults of big blocks glibc malloc unmapped on free and maps again), where it is at least
        NATIVE_SYS_SHOWN of the call's wall time."""
        row = self.native if self.metric == "time" else None
        if not row or row.get("provider") != "native" or not row.get("median") or row.get("sys_ms_per_call") is None:
            return None
        return row["sys_ms_per_call"] if row["sys_ms_per_call"] >= NATIVE_SYS_SHOWN * row["median"] else None

    @property
    def busy(self) -> bool:
        """Measured while other processes kept the cores busy (time rows only)."""
        return self.metric == "time" and any((r or {}).get("other_load") is not None
                                             and r["other_load"] > BUSY_CORES for r in (self.native, self.fastvid))

    @property
    def noise(self) -> Optional[float]:
        """Largest (p80 - p20) / median of the two providers (time rows): how steady the run was."""
        if self.metric != "time":
            return None
        spreads = [(r["p80"] - r["p20"]) / r["median"] for r in (self.native, self.fastvid) if r and r["median"]]
        return max(spreads) if spreads else None


def compare(rows: List[dict]) -> List[Comparison]:
    """Pair native and fastvid rows; table order = first appearance, metrics in METRICS order."""
    table: Dict[Tuple, Comparison] = {}
    for row in rows:
        key = (row["op"], row["shape"], row["dtype"], row["mode"], row["metric"], row.get("isa"))
        comparison = table.setdefault(key, Comparison(*key))
        if row["provider"] in ("native", "fastvid"):
            setattr(comparison, row["provider"], row)
        elif row["provider"] == "copy" and row["metric"] == "bandwidth":  # the limit, in the native column
            comparison.native = row
        elif row["provider"] == "gemm":  # conv_gflops_*: the machine's GEMM rate, in the native column
            comparison.native = row
        elif row["provider"] == "conv_rate":  # conv_gflops_<path>: that path's rate (native's too), fastvid column
            comparison.fastvid = row
        elif row["provider"] == "bound":  # ceiling: the least time the op can take, in the fastvid column
            comparison.fastvid = row
        elif row["provider"] == "sdpa":  # a second baseline: its own comparison, SDPA in the native column
            comparison = table.setdefault((row["op"] + SDPA_SUFFIX, *key[1:]), Comparison(row["op"] + SDPA_SUFFIX, *key[1:]))
            comparison.native = row
        elif row["provider"] == "fastvid_saved":  # the op with save_scores: its own comparison against SDPA
            saved_key = (row["op"] + SAVED_SCORES_SUFFIX, *key[1:])
            table.setdefault(saved_key, Comparison(*saved_key)).fastvid = row
    for key, comparison in table.items():
        if key[0].endswith(SAVED_SCORES_SUFFIX):
            sdpa = table.get((key[0][:-len(SAVED_SCORES_SUFFIX)] + SDPA_SUFFIX, *key[1:]))
            comparison.native = sdpa.native if sdpa else None
        elif key[0].endswith(SDPA_SUFFIX) and (key[0][:-len(SDPA_SUFFIX)], *key[1:]) in table:
            comparison.fastvid = table[(key[0][:-len(SDPA_SUFFIX)], *key[1:])].fastvid
    for key, comparison in table.items():
        if key[4] == "time" and (*key[:4], "ceiling", key[5]) in table:
            comparison.ceiling = table[(*key[:4], "ceiling", key[5])]
            comparison.ceiling.timed = comparison
    group_order: Dict[Tuple, int] = {}
    for key in table:
        group_order.setdefault(key[:3], len(group_order))

    def order(c: Comparison):
        metric_rank = METRICS.index(c.metric) if c.metric in METRICS else len(METRICS)
        mode_rank = 0 if c.mode == "no_grad" else 1
        return group_order[(c.op, c.shape, c.dtype)], metric_rank, mode_rank, _isa_rank(c.isa)

    return sorted(table.values(), key=order)


_ISA_ORDER = ("avx512", "avx2", "baseline")


def _isa_rank(isa: Optional[str]) -> int:
    return _ISA_ORDER.index(isa) if isa in _ISA_ORDER else len(_ISA_ORDER)


def _value(row: Optional[dict], metric: str) -> str:
    if row is None:
        return "n/a"
    text = _FORMAT.get(metric, "{:.3g}").format(row["median"])
    return f"{row['provider']} {text}" if row.get("provider") in ("copy", "gemm") else text


_LAYOUT_SUFFIX = {"channels_last": "+cl", "channels_last_3d": "+cl3d"}


def _ratio(c: "Comparison") -> str:
    if c.ratio is None:
        return "n/a"
    if c.metric == "bandwidth":
        return f"{100 * c.ratio:.0f}% copy"
    return f"{100 * c.ratio:.0f}% gemm" if _is_limit_metric(c.metric) else f"{c.ratio:.2f}x"


def _is_limit_metric(metric: str) -> bool:
    """Rows whose native column holds a machine limit (copy bandwidth, GEMM rate): ratio = fastvid / limit."""
    return metric == "bandwidth" or metric.startswith("conv_gflops")


def _cache_size(value: str) -> str:
    """A row's cache size field (bytes, as text) for the header: MiB, or '?' where the OS did not say
    (0) or the rows predate the field."""
    return f"{int(value) / 2 ** 20:g} MiB" if value.isdigit() and int(value) > 0 else "?"


def format_table(rows: List[dict]) -> str:
    """The printed table (plus a header naming the machine and a legend)."""
    comparisons = compare(rows)
    if not comparisons:
        return "(no results)"
    header = ("op", "shape", "dtype", "mode", "metric", "isa", "native", "fastvid", "ratio", "target", "result",
              "noise", "strategy")
    lines = []
    for c in comparisons:
        target = c.target
        strategy = (c.fastvid or {}).get("strategy", "") or ""
        lines.append((
            c.op, c.shape, c.dtype + _LAYOUT_SUFFIX.get((c.native or c.fastvid or {}).get("layout"), ""),
            c.mode, c.metric, c.isa or "-", _value(c.native, c.metric), _value(c.fastvid, c.metric),
            _ratio(c), target.label if target else "-",
            c.status + (" *" if c.busy else "")
            + (f" (native sys {c.native_sys_ms:.1f} ms)" if c.native_sys_ms else ""),
            "" if c.noise is None else f"{100 * c.noise:.0f}%", strategy,
        ))
    widths = [max(len(str(row[i])) for row in [header] + lines) for i in range(len(header))]
    numeric = {6, 7, 8, 11}

    def render(row):
        return "  ".join(str(v).rjust(w) if i in numeric else str(v).ljust(w)
                         for i, (v, w) in enumerate(zip(row, widths))).rstrip()

    def field(name, default="?"):
        values = sorted({str(row.get(name, default)) for row in rows})
        return values[0] if len(values) == 1 else "mixed (" + ", ".join(values) + ")"

    run_ids = {row.get("run_id") for row in rows}
    out = [f"fastvid {field('version')} | torch {field('torch')} | {field('machine')} | threads {field('threads')} | "
           f"malloc {field('malloc', 'default')} | CPU ISA paths {field('cpu_isa_supported')} "
           f"(bf16 {'native' if field('cpu_isa_bf16') == 'True' else 'emulated'}) | "
           f"L2 {_cache_size(field('cpu_l2_bytes'))}, last-level cache "
           f"{_cache_size(field('cpu_last_level_cache_bytes'))} | "
           + (f"run {field('run_id')}" if len(run_ids) == 1 else f"newest rows of {len(run_ids)} runs")]
    out += [render(header), render(["-" * w for w in widths])]
    out += [render(line) for line in lines]
    loads = [row["other_load"] for row in rows if row.get("other_load") is not None]
    if loads and max(loads) > BUSY_CORES:
        busy = sorted({f"{row['op']} {row['shape']} {row['dtype']} {row['mode']}" for row in rows
                       if (row.get("other_load") or 0) > BUSY_CORES})
        out.append("")
        out.append(f"WARNING: other processes kept up to {max(loads):.1f} cores busy during {len(busy)} of the cases "
                   f"({'; '.join(busy[:4])}{'; ...' if len(busy) > 4 else ''}). With every core in use, "
                   "OpenMP threads can wait for descheduled peers at each parallel region, which can slow the "
                   "native per-step loop (many small ops) far more than fastvid: treat those ratios with "
                   "suspicion and re-run on an idle machine.")
    budgeted = [row for row in rows if row.get("budget_MiB") is not None and row["metric"] == "peak_memory"]
    if budgeted:
        budget = budgeted[0]["budget_MiB"]
        out.append("")
        out.append(f"Memory budget {budget} MiB per layer step (peak_memory rows): "
                   + "; ".join(f"{row['op']} {row['shape']} {row['provider']} {row['median']:.0f} MiB "
                               f"{'fits' if row['fits_budget'] else 'DOES NOT FIT'}" for row in budgeted))
    passed = sum(c.status == "PASS" for c in comparisons)
    missed = sum(c.status.startswith("MISS") for c in comparisons)
    bound = sum(c.status.startswith("MISS") and c.above_ceiling for c in comparisons)
    out.append("")
    out.append(f"{passed} PASS, {missed} MISS" + (f" ({bound} of them above this run's ceiling)" if bound else "")
               + ". ratio = native / fastvid (> 1: fastvid faster / smaller / fewer ops). "
               "MISS xF: fastvid's number must improve F-fold to meet the target. noise = (p80 - p20) / median, the "
               "larger of the two providers. isa: the CPU ISA path fastvid's kernels ran (native is timed again next "
               "to each); a path below the CPU's best is measured in a child process with native PyTorch limited to "
               "the same ISA (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS): an emulated CPU of "
               "that class; bf16 time rows there (or on a CPU without AVX512-BF16) carry no target: native bf16 "
               "is emulated. +cl: channels_last frames; +cl3d: channels_last_3d input and "
               "modules (both providers). bandwidth: fastvid forward (input + output + weight bytes) / median time "
               "of the timed calls that did not fault the output's pages in (as the copy's target is mapped), "
               "vs this run's copy bandwidth (y.copy_(x), 256 MiB fp32, 2 x bytes). conv_gflops_<path>: direct-conv "
               "FLOPs of the forward / its time (gate math included: a lower bound of the conv rate) for native, "
               "fastvid oneDNN (hoisted) and fastvid Winograd, vs this run's torch.mm 1024^3 fp32 rate. "
               "strategy: fastvid's auto choice. ceiling: native's time vs the least time any implementation "
               "could take here (fastvid column: the larger of the bytes it must move at this run's copy bandwidth "
               "and the multiply-adds it must do at this run's FMA peak of the ISA path on all threads; the X3D "
               "block's: its other layers' fastest measured call plus its depthwise conv's least time; fastvid/bench/"
               "ceiling.py): the ratio no kernel can beat (the X3D block's: no depthwise kernel, its other layers as "
               "they are); 'target > ceiling' = this machine cannot meet the target that way, and a time row's MISS is "
               "then marked (bound); 'fastvid at P%' = the least time / fastvid's "
               "time, how close fastvid is to the limit. "
               "(native sys N ms): native's median call spent that much CPU time (all threads) in the kernel, "
               f"{NATIVE_SYS_SHOWN:.0%} of its wall time or more, mostly faulting in pages of "
               "big blocks glibc malloc gave back to the OS and maps again (fastvid's kernels keep theirs: "
               "csrc/cpu_block_cache.cpp); users get this by default, and `bench --malloc-keep` measures both "
               "with freed memory kept (README: CPU memory allocator). "
               "Attention rows: peak_memory = RSS high-water mark of one step in a fresh subprocess (glibc malloc as "
               "users get it), peak_allocated = the tensors' own peak (profiler); other peak_memory rows: the tensors' "
               "own peak (profiler), without the freed blocks fastvid's kernels keep for reuse (up to "
               "FASTVID_CPU_BLOCK_CACHE_MB). "
               f"*: timed while other processes used more than {BUSY_CORES} cores.")
    return "\n".join(out)


def table_from_file(path: str, run_id: Optional[str] = None) -> str:
    """The table for one run of a results file (default: the last run; 'all': newest per case)."""
    from . import results
    return format_table(results.select_run(results.load(path), run_id))
