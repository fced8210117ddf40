"""Measuring a CPU ISA path below the machine's best as a CPU of that class would run it.

Forcing only fastvid's kernels to a lower path (FASTVID_CPU_ISA) leaves native PyTorch on the machine's
best ISA: on an AVX-512 CPU its oneDNN convolutions keep their 512-bit kernels (a 64->128 channel 3x3
conv of 4 x 32^2 frames ran 1.6 ms there vs 4.9 ms limited to AVX2), which is not what a user with an
AVX2 CPU compares against. So the benchmark measures a lower path in a child process whose native
libraries are limited as well, each by the switch it reads at start-up:

- oneDNN (PyTorch's CPU convolutions): ONEDNN_MAX_CPU_ISA,
- ATen's own vectorised kernels (pointwise ops, SDPA's softmax, ...): ATEN_CPU_CAPABILITY,
- MKL (GEMMs): MKL_ENABLE_INSTRUCTIONS (MKL already runs AVX2 code on AMD CPUs),

and fastvid's kernels by FASTVID_CPU_ISA plus ``_cpu_isa_simulate`` (so bf16 counts as emulated, as on
such a CPU). The child measures the cases with :func:`runner.run` and hands its rows back in a file.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence, Tuple

import torch

from . import measure

#: Per fastvid path: the native libraries' switches that limit them to the same ISA class.
NATIVE_LIMITS = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "baseline": {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default",
                 "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}

#: ATen's answer to torch.backends.cpu.get_cpu_capability() once limited (checked in the child).
ATEN_CAPABILITY = {"avx2": "AVX2", "baseline": "DEFAULT"}

#: Set in the child: its runner measures in-process (no grandchildren).
CHILD_VARIABLE = "FASTVID_BENCH_EMULATED_ISA"


def in_child() -> bool:
    return bool(os.environ.get(CHILD_VARIABLE))


def environment(isa: str) -> dict:
    """The child's environment for path ``isa``."""
    return {**os.environ, **NATIVE_LIMITS[isa], "FASTVID_CPU_ISA": isa, CHILD_VARIABLE: isa}


def describe(isa: str) -> str:
    """How the path was measured, for the rows' ``native_limit`` field and the report."""
    return " ".join(f"{key}={value}" for key, value in NATIVE_LIMITS[isa].items())


def run_in_child(isa: str, cases: Sequence[object], rounds: int, warmup: int, device: str, memory: bool,
                 ops: bool, wait_idle: float, extra: Optional[dict]) -> Tuple[List[dict], List[str]]:
    """Measures ``cases`` under path ``isa`` in a child process with native PyTorch
    limited likewise; returns its ``(rows, failures)``. Its log goes to this process's stderr."""
    with tempfile.TemporaryDirectory(prefix="fastvid-bench-") as folder:
        spec_path, result_path = os.path.join(folder, "spec.pickle"), os.path.join(folder, "result.json")
        with open(spec_path, "wb") as f:  # read back by this same package in the child
            pickle.dump({"isa": isa, "cases": list(cases), "rounds": rounds, "warmup": warmup, "device": device,
                     "memory": memory, "ops": ops, "wait_idle": wait_idle, "extra": extra or {},
                     "threads": torch.get_num_threads(), "time_budget": measure.time_budget_seconds,
                     "result": result_path, "parent": os.getpid()}, f)
        command = [sys.executable, "-c", "from fastvid.bench import emulate; emulate.child_main()", spec_path]
        done = subprocess.run(command, env=environment(isa), stdout=sys.stderr)
        if done.returncode != 0 or not os.path.exists(result_path):
            raise RuntimeError(f"fastvid bench: the emulated {isa} child process failed (exit {done.returncode}); "
                               "its log is above")
        with open(result_path) as f:
            result = json.load(f)
    for row in result["rows"]:
        row["native_limit"] = describe(isa)
    return result["rows"], result["failures"]


def die_with_parent(parent: int) -> None:
    """Ends this process when `parent` ends: a bench killed by a signal (not Ctrl-C, which reaches the
    whole process group) otherwise left its child measuring, two cores busy, for many minutes. Linux:
    the kernel sends SIGTERM on the parent's exit (PR_SET_PDEATHSIG); elsewhere nothing is set up."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        pr_set_pdeathsig = 1
        if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "fastvid bench: prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent was gone before the death signal was armed
        raise SystemExit("fastvid bench: the parent process has exited")


def child_main() -> None:
    """Entry point of the child process (see :func:`run_in_child`)."""
    with open(sys.argv[1], "rb") as f:
        spec = pickle.load(f)
    die_with_parent(spec["parent"])
    isa = spec["isa"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != ATEN_CAPABILITY[isa]:
        raise RuntimeError(f"ATEN_CPU_CAPABILITY={NATIVE_LIMITS[isa]['ATEN_CPU_CAPABILITY']} was not honoured: "
                           f"ATen runs {capability}")
    torch.set_num_threads(spec["threads"])
    torch.ops.fastvid._cpu_isa_simulate(isa)  # a CPU whose best path is `isa` (bf16: emulated)
    from . import runner
    measure.time_budget_seconds = spec["time_budget"]
    if spec["extra"].get("malloc") == "keep":
        measure.keep_freed_memory()
    rows, failures = runner.run(spec["cases"], rounds=spec["rounds"], warmup=spec["warmup"], out=None,
                                device=spec["device"], memory=spec["memory"], ops=spec["ops"],
                                wait_idle=spec["wait_idle"], extra=spec["extra"], isas=[isa])
    with open(spec["result"], "w") as f:
        json.dump({"rows": rows, "failures": failures}, f)
