"""Where multi-threaded time goes in one benchmark step: per parallel region call site (every
at::parallel_for, ours and ATen's), regions per step, wall time and each thread's busy time inside the
region body, and the wall time between regions (serial: Python, dispatch, allocation, single-threaded
code). Busy below wall = that thread waited (imbalance); serial time = every other thread waited.
The serial time is also listed by the pair of regions around it (the largest --gaps of them), and
--trace lists the last step's regions in order with the serial time before each.

    .venv/bin/python scripts/omp_regions.py "ConvGRU-B=4,T=8,C=32,32x32-bf16-fwd_bwd" --threads 2

The case is a `python -m fastvid bench` case name (exact); --provider native profiles PyTorch's side.
Builds scripts/omp_regions.c (an LD_PRELOAD wrapper of libgomp's GOMP_parallel) into a temporary
folder and re-runs itself with it preloaded. Linux + GCC/libgomp builds of torch only.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PRELOADED = "FASTVID_OMP_REGIONS_LIB"


def build_shim() -> str:
    lib = os.path.join(tempfile.mkdtemp(prefix="omp_regions_"), "omp_regions.so")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-fopenmp", "-o", lib, os.path.join(HERE, "omp_regions.c"),
                    "-ldl"], check=True)
    return lib


def site_name(lib: str, offset: str) -> str:
    """The function a parallel region runs, from its call site: the body passed to at::parallel_for
    (its innermost named function) or, for ATen's helpers, the caller's own name."""
    try:  # -i: the chain of inlined functions at the call, innermost first (function and file lines alternate)
        lines = subprocess.run(["addr2line", "-f", "-i", "-C", "-e", lib, offset], capture_output=True, text=True,
                               check=True).stdout.splitlines()[0::2]
    except (OSError, subprocess.CalledProcessError):
        lines = []
    if not lines or lines[0].startswith("??"):
        return f"{os.path.basename(lib)}+{offset}"
    name = next((line for line in lines if "parallel_for<" in line), lines[-1])
    name = re.sub(r"fastvid::\w+::(isa_\w+::)?(\(anonymous namespace\)::)?", "", name)
    body = name.split("parallel_for<", 1)[1] if "parallel_for<" in name else name
    match = re.search(r"([\w:]+)(?:<[^()<>]*>)?\(", body)
    return match.group(1) if match else body[:60]


def find_case(name: str):
    """(bench module, case) of the benchmark case called `name`."""
    from fastvid.bench import attention, cases, depthwise
    candidates = [(cases, c) for c in cases.iter_cases()]
    candidates += [(depthwise, c) for c in depthwise.iter_cases(dtypes=depthwise.DTYPES)]
    candidates += [(attention, c) for c in attention.iter_cases()]
    for module, case in candidates:
        if case.name == name:
            return module, case
    raise SystemExit(f"omp_regions: no benchmark case named {name!r} (see `python -m fastvid bench` output)")


def profile(args) -> None:
    import ctypes

    import torch
    torch.set_num_threads(args.threads)
    module, case = find_case(args.case)
    # The auto strategy choice times candidates once, under this shim's per-region cost: --strategy pins it.
    kwargs = {"strategy": args.strategy} if args.strategy else {}
    workload = module.build(case, **kwargs)[args.provider]
    for _ in range(args.warmup):
        workload()
    shim = ctypes.CDLL(os.environ[PRELOADED])
    report = os.path.join(os.path.dirname(os.environ[PRELOADED]), "report.txt")
    shim.omp_regions_start()
    start = time.perf_counter()
    for _ in range(args.calls):
        workload()
    wall = 1e3 * (time.perf_counter() - start) / args.calls
    shim.omp_regions_report(args.calls, args.threads, report.encode())
    sites, gaps, trace, serial = [], [], [], 0.0
    with open(report) as f:
        for line in f:
            fields = line.split()
            if fields[0] == "serial":
                serial = float(fields[1])
            elif fields[0] == "trace":
                trace.append((int(fields[1]), float(fields[2]), float(fields[3])))
            elif fields[0] == "gap":
                gaps.append((int(fields[1]), int(fields[2]), float(fields[3]), float(fields[4])))
            else:
                sites.append((site_name(fields[1], fields[2]), float(fields[3]), float(fields[4]),
                              [float(v) for v in fields[5:]]))
    print(f"{case.name} [{args.provider}], {args.threads} threads, {args.calls} steps: {wall:.2f} ms per step")
    print(f"{'regions':>8} {'wall ms':>8}  busy ms per thread  region body")
    for name, regions, region_wall, busy in sorted(sites, key=lambda s: -s[2]):
        if region_wall >= args.min_ms:
            print(f"{regions:8.1f} {region_wall:8.3f}  {' / '.join(f'{b:.3f}' for b in busy):18s}  {name}")
    in_regions = sum(s[2] for s in sites)
    busy = [sum(s[3][i] for s in sites) for i in range(args.threads)]
    print(f"in regions {in_regions:.2f} ms (busy per thread {' / '.join(f'{b:.2f}' for b in busy)}), "
          f"between regions (serial) {serial:.2f} ms")
    print(f"largest serial gaps, by the regions around them:\n{'gaps':>8} {'ms':>8}  after -> before")
    for before, after, count, ms in sorted(gaps, key=lambda g: -g[3])[:args.gaps]:
        print(f"{count:8.1f} {ms:8.3f}  {sites[before][0]} -> {sites[after][0]}")
    if args.trace:
        per_call = round(sum(s[1] for s in sites))
        print(f"the last step's {per_call} regions in order:\n{'serial ms':>10} {'wall ms':>8}  region body")
        for site, gap, wall in trace[-per_call:]:
            print(f"{gap:10.3f} {wall:8.3f}  {sites[site][0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", help="a benchmark case name, e.g. ConvGRU-B=4,T=8,C=32,32x32-bf16-fwd_bwd")
    parser.add_argument("--provider", default="fastvid", choices=("fastvid", "native"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strategy", choices=("hoisted", "concat", "winograd"),
                        help="ConvLSTM/ConvGRU cases: fastvid's strategy (default: the auto choice)")
    parser.add_argument("--calls", type=int, default=30, help="timed steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--min-ms", type=float, default=0.02, help="hide call sites below this wall time per step")
    parser.add_argument("--trace", action="store_true", help="list the last step's regions in order")
    parser.add_argument("--gaps", type=int, default=12, help="how many of the largest serial gaps to list")
    args = parser.parse_args()
    if PRELOADED not in os.environ:
        lib = build_shim()
        env = dict(os.environ, LD_PRELOAD=lib, **{PRELOADED: lib})
        sys.exit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)
    profile(args)


if __name__ == "__main__":
    main()
