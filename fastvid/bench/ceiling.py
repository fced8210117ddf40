"""Ceilings (issue 11, "where a target cannot hold, show the bound"): the best native/fastvid ratio
any implementation of the same computation could reach in this run.

A ``ceiling`` row pairs native's time (native column) with the least time the op can take on this
machine (fastvid column, provider ``bound``): the larger of

* the bytes it must move at least, at this run's copy bandwidth (:func:`depthwise.copy_bandwidth`:
  the same yardstick as the ``bandwidth`` rows), and
* the multiply-adds it must do, at this run's multiply-add peak of the active CPU ISA path on all
  threads (:func:`fma_peak`: independent FMA chains, ``csrc/cpu_peak.cpp``; the optimistic one of
  all threads at once and one thread times the thread count),

so the ratio is the ceiling on native/fastvid. The report marks a ceiling row ``reachable`` or
``target > ceiling``: a MISS of the time row above such a ceiling is not a kernel to improve but a
target this machine cannot meet with this op alone (the two terms are taken as fully overlapped,
so real kernels stay below the ceiling).

Where one term cannot be derived from sizes, it is measured: the X3D block's ceiling is its other
layers' time (the fastvid block with its depthwise conv replaced by the identity, timed in the same
cycle; its fastest call) plus the depthwise conv's own bound.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..ops.depthwise3d import _output_size

#: Rounds of the FMA chains per thread per measurement (~3-7 ms), and measurements (the best counts).
FMA_ITERATIONS = 2_000_000
FMA_ROUNDS = 10

_fma_cache: Dict[tuple, float] = {}


def fma_peak() -> float:
    """Multiply-adds (fp32 lanes) per second on all of this process's threads, on the active CPU ISA
    path: the larger of all threads measured at once and one thread's rate times the thread count (on
    a shared VM a neighbour can hold a core through a whole measurement: once the emulated-AVX2 child
    measured one core's rate with two threads, and fastvid's attention came out faster than the
    'least' time). A ceiling must not be too low, so the optimistic figure counts. Measured once per
    (path, thread count) and process."""
    threads = torch.get_num_threads()
    key = (torch.ops.fastvid._cpu_isa(), threads)
    if key not in _fma_cache:
        together = torch.ops.fastvid._cpu_fma_peak(FMA_ITERATIONS, FMA_ROUNDS)
        torch.set_num_threads(1)
        try:
            one = torch.ops.fastvid._cpu_fma_peak(FMA_ITERATIONS, FMA_ROUNDS)
        finally:
            torch.set_num_threads(threads)
        _fma_cache[key] = max(together, threads * one)
    return _fma_cache[key]


def least_seconds(nbytes: float, multiply_adds: float, copy_bytes_per_s: float, fma_per_s: float) -> Dict[str, float]:
    """The memory and compute terms and their maximum, the least time (seconds)."""
    memory, compute = nbytes / copy_bytes_per_s, multiply_adds / fma_per_s
    return {"memory_s": memory, "compute_s": compute, "least_s": max(memory, compute)}


def in_range_taps(sizes, k: int, strides, padding: int) -> int:
    """(output position, tap) pairs of one channel of a depthwise conv (cubic kernel k, dilation 1, this
    padding on every side) whose input position lies inside the input: its multiply-adds per pass. Taps on
    the zero padding contribute nothing, so an implementation may skip them (at 8x28x28 with k = 3 and
    padding 1 they are 13 % of all taps)."""
    pairs = 1
    for n, stride in zip(sizes, strides):  # each dimension's valid taps independently
        outputs = _output_size(n, k, stride, padding, 1)
        pairs *= sum(0 <= o * stride - padding + t < n for o in range(outputs) for t in range(k))
    return pairs


def depthwise_work(in_numel: int, out_numel: int, taps: int, mode: str, element_bytes: int = 4) -> Dict[str, float]:
    """What a depthwise conv (multiplier 1) with input and output of these sizes must do at least, with
    ``taps`` in-range (output position, tap) pairs in all (in_range_taps times batch and channels).
    Forward: read x, write y, one multiply-add per pair. Forward+backward adds reading grad_output and x
    again (the weight gradient needs both) and writing grad_input, and twice the multiply-adds (input and
    weight gradient); the weights are negligible."""
    if mode == "no_grad":
        elements, passes = in_numel + out_numel, 1
    else:
        elements, passes = 3 * in_numel + 2 * out_numel, 3
    return {"bytes": elements * element_bytes, "multiply_adds": passes * taps}


def bound_fields(least: Dict[str, float], **extra) -> dict:
    """The ``bound`` provider's ``ceiling`` row fields (ms): the least time and its two terms."""
    bound_ms = 1e3 * least["least_s"]
    return {"median": bound_ms, "p20": bound_ms, "p80": bound_ms, "memory_ms": 1e3 * least["memory_s"],
            "compute_ms": 1e3 * least["compute_s"], **extra}
