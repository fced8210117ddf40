"""Nonlocal attention: fastvid vs the naive computation (and SDPA), with pytest-benchmark.

The cases come from ``fastvid.bench.attention``, the definitions ``python -m fastvid bench`` uses:
op level ``fastvid.ops.nonlocal_attention`` vs naive ``softmax(q kᵀ·scale) v`` vs
``F.scaled_dot_product_attention`` (B=2, D=128), and block level the naive nonlocal block vs
``fastvid.convert`` of it (C=256, inter=128). Each benchmark group is one case, so the providers
print side by side. Parity (outputs and gradients) is asserted before timing; nothing here asserts
on time — targets and the subprocess peak-memory rows are reported by ``python -m fastvid bench``.

    python -m pytest benchmarks/test_bench_attention.py -q --benchmark-min-rounds=3
    FASTVID_BENCH_LARGE=1 python -m pytest benchmarks/test_bench_attention.py -q --benchmark-min-rounds=3
"""
import functools
import os

import pytest
import torch

from fastvid.bench import attention

LARGE = os.environ.get("FASTVID_BENCH_LARGE", "0") == "1"
_large = [pytest.mark.large, pytest.mark.skipif(not LARGE, reason="more shapes: set FASTVID_BENCH_LARGE=1")]
_QUICK = set(attention.iter_cases(quick=True))


def _params():
    params = []
    for case in attention.iter_cases(quick=False):
        marks = [] if case in _QUICK else _large
        for provider in case.providers:
            params.append(pytest.param(case, provider, marks=marks, id=f"{case.name}-{provider}"))
    return params


@functools.lru_cache(maxsize=1)  # the providers of a case run consecutively: build and check once
def _workloads(case):
    workloads = attention.build(case)
    attention.check_parity(workloads)
    return workloads


@pytest.mark.parametrize("case,provider", _params())
def test_attention(benchmark, case, provider):
    step = _workloads(case)[provider]
    step()  # warm-up
    benchmark.group = case.name
    benchmark.extra_info.update(op=case.op, shape=case.shape.label, dtype=case.dtype, mode=case.mode,
                                provider=provider, threads=torch.get_num_threads())
    benchmark(step)


@pytest.mark.parametrize("mode", attention.MODES)
def test_attention_flops_match_flop_counter(mode):
    """attention_flops (the FLOP-rate rows' numerator) against torch's FlopCounterMode on the naive
    computation, which stores P and so has no recomputed product (recompute=False)."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = attention.AttnShape(2, 48, 20, D=16)
    q, k, v = (torch.randn(shape.B, rows, shape.D, requires_grad=mode == "fwd_bwd") for rows in (48, 20, 20))
    with FlopCounterMode(display=False) as counter:
        out = attention.naive_attention(q, k, v, 0.25)
        if mode == "fwd_bwd":
            out.sum().backward()
    assert counter.get_total_flops() == attention.attention_flops(shape, mode, recompute=False)
