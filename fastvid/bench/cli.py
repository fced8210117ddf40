"""``python -m fastvid bench``: arguments and entry point (wired up in fastvid/__main__.py).

    python -m fastvid bench --quick                         # <= 5 min on a 2-core machine, best two ISA paths
    python -m fastvid bench --only DepthwiseConv3d --isa avx2   # one CPU ISA path (default: every path)
    python -m fastvid bench --quick --wait-idle 120         # on a shared machine
    python -m fastvid bench --only ConvGRU --only bf16      # a subset (substring match, any)
    python -m fastvid bench --only DepthwiseConv3d --only X3DBlock   # the depthwise cases of issue 3
    python -m fastvid bench --only NonlocalAttention --only NonLocalBlock   # the attention cases of issue 4
    python -m fastvid bench --report bench-results/results.jsonl [--run-id all]
    python -m fastvid bench --report bench-results/results.jsonl --plot bench-results/plots   # PNG charts
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Optional

import torch

import fastvid

from .. import _argtypes
from .._info import CPU_ISA_PATHS
from . import attention, cases, depthwise, measure, report, results, runner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"smaller run: ConvGRU on the first shape only, DepthwiseConv3d on the first X3D shape (+ its "
                             f"bandwidth row) and the X3D block forward+backward only, {runner.QUICK_ROUNDS} rounds after "
                             f"{runner.QUICK_WARMUP} warm-up call (at least {measure.MIN_ROUNDS} once a case's timed calls pass "
                             f"{runner.QUICK_TIME_BUDGET_S:.0f} s; default {runner.FULL_ROUNDS} rounds, "
                             f"{runner.FULL_WARMUP} warm-up calls)")
    parser.add_argument("--out", metavar="FILE", default=results.DEFAULT_PATH,
                        help="results file the rows are appended to (JSON lines; default: %(default)s)")
    parser.add_argument("--no-save", action="store_true", help="do not append the rows to the results file")
    parser.add_argument("--report", metavar="FILE",
                        help="measure nothing: print the table of a results file and exit")
    parser.add_argument("--plot", metavar="DIR", default=None,
                        help="also draw PNG charts into DIR (fastvid/bench/plot.py): of this run, or of --report FILE")
    parser.add_argument("--run-id", default=None,
                        help="with --report: which run ('latest' (default), 'all' = newest row per case, or an id)")
    parser.add_argument("--rounds", type=_argtypes.positive_int, default=None,
                        help="timed rounds per provider and case")
    parser.add_argument("--warmup", type=_argtypes.non_negative_int, default=None,
                        help="untimed calls per provider and case")
    parser.add_argument("--only", metavar="TEXT", action="append", default=None,
                        help="run only cases whose name contains TEXT (repeatable, any matches), "
                             "e.g. --only ConvGRU --only bf16-fwd_bwd, --only DepthwiseConv3d --only X3DBlock")
    parser.add_argument("--threads", type=_argtypes.positive_int, default=None,
                        help="torch.set_num_threads(N) first (default: torch's choice)")
    parser.add_argument("--device", type=_argtypes.device, default="cpu",
                        help="device to run on (default: %(default)s)")
    parser.add_argument("--wait-idle", type=_argtypes.non_negative_float, default=0.0, metavar="SECONDS",
                        help="before each case wait up to SECONDS for other processes to leave the cores idle "
                             "(on a shared machine, neighbours distort timings badly; default: don't wait)")
    parser.add_argument("--malloc-keep", action="store_true",
                        help="make glibc malloc keep freed memory instead of unmapping it (no page faults from "
                             "re-mapped big blocks); rows record malloc='keep'. Default: glibc's defaults, as users get")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    parser.add_argument("--no-ops", action="store_true", help="skip the dispatched-ops count")
    parser.add_argument("--isa", metavar="PATHS", default=None,
                        help="CPU ISA paths to measure fastvid under, each case once per path: comma-separated "
                             "(avx512,avx2,baseline), 'all' = every path this CPU supports (default of full runs), "
                             "'active' = only the current one (FASTVID_CPU_ISA's). A path below the CPU's best is "
                             "measured in a child process with native PyTorch limited to it too (fastvid/bench/emulate.py). "
                             "Default of --quick (5-minute budget): "
                             "AVX-512 and AVX2 (the AVX2 path alone on an AVX2-only CPU, baseline only without AVX2) for the depthwise, attention "
                             "and fp32 ConvLSTM/ConvGRU cases, the best path for the others")
    parser.add_argument("--bf16-emulated", action="store_true",
                        help="with --quick: run the bf16 cases even on a CPU without native bf16 arithmetic "
                             "(they are left out there by default: emulated, slow, not what such a CPU runs)")


def quick_isa_paths(paths):
    """The ISA paths ``--quick`` runs at all (``paths`` best first): the vector paths issues 11 and 12 target
    (AVX-512, AVX2); the baseline only on a CPU without AVX2 (measured as an emulated SSE CPU, its native
    calls would take minutes)."""
    return [p for p in paths if p != "baseline"][:2] or paths[:1]


def quick_paths(case, paths):
    """The ISA paths ``--quick`` measures ``case`` under (5-minute budget; ``paths`` best first): the
    best two for the depthwise, attention and fp32 recurrent cases (their kernels differ per path and
    issues 11 and 12 set targets on both), the best one for the rest."""
    both = isinstance(case, (depthwise.DWCase, attention.AttnCase)) or getattr(case, "dtype", "") == "fp32"
    return paths[:2] if both else paths[:1]


def _usage_problem(args: argparse.Namespace) -> Optional[str]:
    """What makes these options unusable, found before any measuring (each was found only after a run: a
    traceback at the end, or an option silently ignored)."""
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            return "--plot needs matplotlib: pip install matplotlib"
        if os.path.exists(args.plot) and not os.path.isdir(args.plot):
            return f"--plot {args.plot}: exists and is not a folder"
    if args.report:
        if args.only:
            return "--only selects cases to measure; --report measures nothing (it prints the file's rows)"
        return None
    if args.run_id is not None:
        return "--run-id selects a run of --report FILE; without --report it does nothing"
    if not args.no_save and os.path.isdir(args.out):
        return f"--out {args.out}: is a folder, not a results file"
    if args.isa not in (None, "all", "active") and len(set(args.isa.split(","))) != len(args.isa.split(",")):
        return f"--isa {args.isa}: a path named twice"
    return None


def main(args: argparse.Namespace) -> int:
    problem = _usage_problem(args)
    if problem:
        print(f"fastvid bench: {problem}", file=sys.stderr)
        return 2
    if args.report:
        try:
            print(report.table_from_file(args.report, args.run_id))
            if args.plot:
                rows = results.load(args.report)
                _plot(results.select_run(rows, args.run_id), args.plot, speedup_rows=rows)
        except (OSError, ValueError) as exc:
            print(f"fastvid bench --report: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    all_cases = (list(cases.iter_cases(quick=args.quick)) + list(depthwise.iter_cases(quick=args.quick))
                 + list(attention.iter_cases(quick=args.quick)))
    selected = [c for c in all_cases
                if not args.only or any(text in c.name for text in args.only)]
    if args.quick and not args.bf16_emulated and not runner.bf16_native(args.device):
        emulated = [c for c in selected if getattr(c, "dtype", "") == "bf16"]
        selected = [c for c in selected if c not in emulated]
        if emulated:
            print(f"bf16: emulated on this CPU (no AVX512-BF16); left out of the quick run: "
                  f"{', '.join(c.name for c in emulated)} (--bf16-emulated runs them)")
    if not selected:
        print(f"no case matches {args.only}", file=sys.stderr)
        return 2
    paths = runner.cpu_isa_paths(args.device)
    isas_of = None
    if args.isa is None and args.quick:
        paths = quick_isa_paths(paths)
        isas_of = lambda case: quick_paths(case, paths)  # noqa: E731
    elif args.isa == "active":  # the path fastvid runs now (FASTVID_CPU_ISA's): its rows say which, and a path
        # below the CPU's best is measured as the others are, with native limited to it in a child process
        paths = [fastvid.info()["cpu_isa"]] if paths != [None] else [None]
    elif args.isa not in (None, "all"):
        wanted = args.isa.split(",")
        names = [p for p in wanted if p not in CPU_ISA_PATHS]
        if names:
            print(f"--isa {args.isa}: {names} not a CPU ISA path (the paths: {', '.join(CPU_ISA_PATHS)}, or 'all', "
                  "'active')", file=sys.stderr)
            return 2
        unknown = [p for p in wanted if p not in paths]
        if unknown:
            print(f"--isa {args.isa}: {unknown} not supported by this CPU (it runs {paths})", file=sys.stderr)
            return 2
        paths = wanted
    if args.quick and not args.rounds:
        measure.time_budget_seconds = runner.QUICK_TIME_BUDGET_S
    rounds = args.rounds or (runner.QUICK_ROUNDS if args.quick else runner.FULL_ROUNDS)
    warmup = args.warmup if args.warmup is not None else (runner.QUICK_WARMUP if args.quick else runner.FULL_WARMUP)
    malloc = "default"
    if args.malloc_keep:
        if not measure.keep_freed_memory():
            print("--malloc-keep: cannot tune malloc here (not glibc)", file=sys.stderr)
            return 2
        malloc = "keep"
    print(f"torch.get_num_threads() = {torch.get_num_threads()}")
    rows, failures = runner.run(selected, rounds=rounds, warmup=warmup, out=None if args.no_save else args.out,
                                device=args.device, memory=not args.no_memory, ops=not args.no_ops,
                                wait_idle=args.wait_idle, extra={"malloc": malloc}, isas=paths,
                                isas_of=isas_of)
    print(report.format_table(rows))
    if args.plot:
        _plot(rows, args.plot)
    if failures:
        print("\nPARITY FAILURES (these cases were not timed):\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


def _plot(rows, folder, speedup_rows=None) -> None:
    from . import plot  # matplotlib only when asked for
    for path in plot.plot(rows, folder, speedup_rows):
        print(f"wrote {path}")
