"""ConvLSTM / ConvGRU: fastvid vs the per-step native PyTorch module, with pytest-benchmark.

The cases (shapes x dtype x mode) and both implementations come from ``fastvid.bench.cases``,
the same definitions ``python -m fastvid bench`` uses. Each benchmark group is one case, so
native and fastvid print side by side. Before anything is timed, the two providers are checked
to compute the same outputs and gradients (an AssertionError otherwise); nothing here asserts
on time — speed goals are reported by ``python -m fastvid bench``.

    python -m pytest benchmarks -q --benchmark-min-rounds=3                  # small shape
    FASTVID_BENCH_LARGE=1 python -m pytest benchmarks -q --benchmark-min-rounds=3   # + large
    python -m pytest benchmarks -q -k "ConvGRU and bf16"                     # a subset
"""
import functools
import os

import pytest
import torch

from fastvid.bench import cases

LARGE = os.environ.get("FASTVID_BENCH_LARGE", "0") == "1"
_large = [pytest.mark.large, pytest.mark.skipif(not LARGE, reason="large shape: set FASTVID_BENCH_LARGE=1")]


def _params():
    """One param per (case, provider), case-major so both providers of a case run back to back."""
    params = []
    for case in cases.iter_cases(quick=False):
        marks = _large if case.shape != cases.SMALL else []
        for provider in cases.PROVIDERS:
            params.append(pytest.param(case, provider, marks=marks, id=f"{case.name}-{provider}"))
    return params


@functools.lru_cache(maxsize=1)  # the two providers of a case run consecutively: build and check once
def _workloads(case):
    """The case's native and fastvid workloads, checked for parity; plus fastvid's auto strategy."""
    workloads = cases.build(case)
    strategy = cases.strategy_of(lambda: cases.check_parity(workloads))
    return workloads, strategy


@pytest.mark.parametrize("case,provider", _params())
def test_recurrent(benchmark, case, provider):
    workloads, strategy = _workloads(case)
    step = workloads[provider]
    step()  # warm-up: oneDNN primitives, allocator
    benchmark.group = case.name
    benchmark.extra_info.update(op=case.op, shape=case.shape.label, dtype=case.dtype, mode=case.mode,
                                provider=provider, threads=torch.get_num_threads())
    if provider == "fastvid":
        benchmark.extra_info["strategy"] = strategy
    benchmark(step)
