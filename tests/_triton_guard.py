"""Records, for every kernel launch of a Triton kernel module, the device whose guard
(``_common.device_guard``) is entered around it: the CPU-runnable half of the device-guard tests
(the other half runs on ``cuda:1`` where two GPUs exist)."""
import contextlib

import pytest
import torch

from fastvid.triton_kernels import _common

requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@contextlib.contextmanager
def launch_devices(monkeypatch, module):
    """Yields a list that gets, per launch in ``module``, the device of the enclosing guard (None
    when launched outside one)."""
    current = [None]
    launches = []

    @contextlib.contextmanager
    def guard(t):
        current.append(t.device)
        try:
            with torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext():
                yield
        finally:
            current.pop()

    real_wrap = module.wrap_triton

    def wrap(kernel):
        launches.append(current[-1])
        return real_wrap(kernel)

    monkeypatch.setattr(_common, "device_guard", guard)
    monkeypatch.setattr(module, "wrap_triton", wrap)
    yield launches

