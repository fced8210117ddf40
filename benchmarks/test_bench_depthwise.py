"""DepthwiseConv3d and an X3D-style block: fastvid vs native PyTorch, with pytest-benchmark.

The cases (X3D shapes x mode, the X3D block) and both implementations come from
``fastvid.bench.depthwise``, the same definitions ``python -m fastvid bench`` uses: native
``nn.Conv3d(C, C, 3, stride, padding=1, groups=C)`` vs ``fastvid.nn.DepthwiseConv3d`` with the same
weights, and an X3D bottleneck vs ``fastvid.convert`` of a deep copy; each case in both layouts
(``ncdhw``: contiguous; ``cl3d``: channels_last_3d inputs and modules), the same for both providers. Each benchmark group is one case, so native and fastvid print side by
side. Parity (outputs and gradients) is asserted before timing; nothing here asserts on time —
the speed targets and the bandwidth rows are reported by ``python -m fastvid bench``.

    python -m pytest benchmarks -q --benchmark-min-rounds=3                     # first shape + block
    FASTVID_BENCH_LARGE=1 python -m pytest benchmarks -q --benchmark-min-rounds=3   # all four shapes
    python -m pytest benchmarks -q -k "DepthwiseConv3d and fwd_bwd"            # a subset
"""
import functools
import os

import pytest
import torch

from fastvid.bench import depthwise

LARGE = os.environ.get("FASTVID_BENCH_LARGE", "0") == "1"
_large = [pytest.mark.large, pytest.mark.skipif(not LARGE, reason="more shapes: set FASTVID_BENCH_LARGE=1")]
_QUICK = set(depthwise.iter_cases(quick=True))


def _params():
    """One param per (case, provider), case-major; cases outside the quick set are marked large."""
    params = []
    for case in depthwise.iter_cases(quick=False):
        marks = [] if case in _QUICK else _large
        for provider in depthwise.PROVIDERS:
            params.append(pytest.param(case, provider, marks=marks, id=f"{case.name}-{provider}"))
    return params


@functools.lru_cache(maxsize=1)  # the two providers of a case run consecutively: build and check once
def _workloads(case):
    workloads = depthwise.build(case)
    depthwise.check_parity(workloads)
    return workloads


@pytest.mark.parametrize("case,provider", _params())
def test_depthwise(benchmark, case, provider):
    step = _workloads(case)[provider]
    step()  # warm-up: oneDNN primitives, allocator
    benchmark.group = case.name
    benchmark.extra_info.update(op=case.op, shape=case.shape.label, dtype=case.dtype, mode=case.mode,
                                provider=provider, layout=depthwise.LAYOUT_ROW[case.layout], threads=torch.get_num_threads())
    benchmark(step)
