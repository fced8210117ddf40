"""pytest-benchmark configuration for fastvid's suites.

Run: ``python -m pytest benchmarks -q --benchmark-min-rounds=3``. Large shapes are marked
``large`` and skipped unless ``FASTVID_BENCH_LARGE=1`` is set.
"""
import os

import torch

LARGE = os.environ.get("FASTVID_BENCH_LARGE", "0") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "large: large benchmark shapes (run with FASTVID_BENCH_LARGE=1)")


def pytest_report_header(config):
    import fastvid
    info = fastvid.info()
    isa = {k: v for k, v in info.items() if "isa" in k}
    return (f"fastvid benchmarks: torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
            f"large shapes {'on' if LARGE else 'off (FASTVID_BENCH_LARGE=1 to run them)'}; CPU ISA {isa} "
            "(FASTVID_CPU_ISA=avx2|baseline measures a lower path)")
