"""fastvid's benchmark runner: fastvid vs native PyTorch, behind ``python -m fastvid bench``.

* :mod:`~fastvid.bench.cases`   what is measured (shared with the pytest-benchmark suites in
  ``benchmarks/``): shapes, cases, the native baseline modules, parity check.
* :mod:`~fastvid.bench.measure` how: interleaved timing, peak memory, dispatched ops per step.
* :mod:`~fastvid.bench.runner`  runs cases, appends rows to the results file.
* :mod:`~fastvid.bench.results` the JSON-lines results file (one row per provider and metric).
* :mod:`~fastvid.bench.report`  results -> table with ratios, targets and PASS/MISS.

Usage::

    python -m fastvid bench --quick                  # measure, append rows, print the table
    python -m fastvid bench --report bench-results/results.jsonl   # table of the last run
"""
from .cases import Case, Shape, build, check_parity, iter_cases  # noqa: F401
from .report import format_table, table_from_file  # noqa: F401
from .runner import run  # noqa: F401

__all__ = ["Case", "Shape", "build", "check_parity", "iter_cases", "run", "format_table", "table_from_file"]
