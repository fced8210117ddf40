"""The CPU ISA paths (csrc/cpu_isa.h) this machine can run, for parity tests: a test that takes the
``cpu_isa`` fixture (import it into the test module) runs once per path, with that path forced."""
import contextlib

import pytest
import torch

import fastvid
from fastvid._info import CPU_ISA_PATHS


def supported_paths():
    """The paths this CPU can execute, lowest first (just ``baseline`` without the extension)."""
    if not fastvid.info()["cpu_kernels"]:
        return ["baseline"]
    return fastvid.info()["cpu_isa_supported"]


@contextlib.contextmanager
def forced_isa(isa):
    """Runs the block with the CPU kernels on path ``isa``, restoring the previous path after."""
    ops = torch.ops.fastvid
    previous = ops._cpu_isa()
    ops._set_cpu_isa(isa)
    try:
        yield isa
    finally:
        ops._set_cpu_isa(previous)


@pytest.fixture(params=supported_paths())
def cpu_isa(request):
    """Each supported CPU ISA path in turn, forced for the test's duration."""
    if not fastvid.info()["cpu_kernels"]:
        yield request.param
        return
    with forced_isa(request.param):
        yield request.param


__all__ = ["CPU_ISA_PATHS", "cpu_isa", "forced_isa", "supported_paths"]
