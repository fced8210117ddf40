"""PNG charts of benchmark results (``python -m fastvid bench ... --plot DIR``).

From result rows (fastvid/bench/results.py) it draws, into DIR:

* ``time-<op>.png`` per op family: native and fastvid time per case (shape, dtype) and mode, side by
  side, with the target drawn as a tick at the time fastvid has to reach (native / required speedup);
* ``speedup.png``: native / fastvid time of every case, one bar per platform — the rows' ``isa``
  (the CPU kernel path) and ``device`` fields where they exist — with the target speedups as ticks.

Needs matplotlib (requirements-dev.txt); the Agg backend, no display.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Tuple

from . import report

_TIME = "time"


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def platform(row: dict) -> str:
    """What a row ran on, for the speedup chart: device and CPU kernel path (``isa``) where recorded."""
    parts = [str(row.get("device", "cpu"))]
    if row.get("isa"):
        parts.append(str(row["isa"]))
    return " ".join(parts)


def target_value(target: report.Target, native: float) -> Optional[float]:
    """The fastvid value at which ``target`` is exactly met, given the native value. Every target is
    of the form shortfall = max(1, fastvid / limit), so a fastvid value far past the limit gives the
    limit back as value / shortfall."""
    far = 1e12 * max(abs(native), 1.0)
    shortfall = target.shortfall(native, far)
    return far / shortfall if shortfall > 1 else None


def _case_label(c: report.Comparison, with_isa: bool = True) -> str:
    row = c.fastvid or c.native or {}
    layout = report._LAYOUT_SUFFIX.get(row.get("layout"), "")  # the table's +cl / +cl3d
    isa = row.get("isa") if with_isa else None
    return f"{c.shape} {c.dtype}{layout} {c.mode}" + (f" [{isa}]" if isa else "")


def _time_comparisons(rows: List[dict]) -> List[report.Comparison]:
    return [c for c in report.compare(rows) if c.metric == _TIME and (c.native or c.fastvid)]


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "op"


def plot_times(rows: List[dict], folder: str) -> List[str]:
    """One horizontal bar chart per op family: native vs fastvid ms per case and mode, target ticks."""
    plt = _matplotlib()
    by_op: Dict[str, List[report.Comparison]] = {}
    for c in _time_comparisons(rows):
        by_op.setdefault(c.op, []).append(c)
    paths = []
    for op, comparisons in by_op.items():
        labels = [_case_label(c) for c in comparisons]
        native = [c.native["median"] if c.native else 0.0 for c in comparisons]
        fastvid = [c.fastvid["median"] if c.fastvid else 0.0 for c in comparisons]
        baseline = comparisons[0].native.get("provider", "native") if comparisons[0].native else "native"
        figure, axes = plt.subplots(figsize=(9, 1.2 + 0.55 * len(comparisons)))
        positions = range(len(comparisons))
        height = 0.38
        axes.barh([p - height / 2 for p in positions], native, height, label=baseline, color="#9e9e9e")
        axes.barh([p + height / 2 for p in positions], fastvid, height, label="fastvid", color="#1f77b4")
        target_label = "target (fastvid time to reach)"
        for p, c in zip(positions, comparisons):
            target = c.target
            limit = target_value(target, c.native["median"]) if target and c.native else None
            if limit is not None:
                axes.plot([limit, limit], [p - 0.45, p + 0.45], color="#d62728", linewidth=2, label=target_label)
                target_label = None  # one legend entry
            if c.ratio is not None:
                axes.annotate(f"{c.ratio:.2f}x", (max(native[p], fastvid[p]), p), xytext=(4, -4),
                              textcoords="offset points", fontsize=8)
        axes.set_yticks(list(positions), labels, fontsize=8)
        axes.invert_yaxis()
        axes.set_xlabel("median time per call (ms), lower is better")
        axes.set_title(f"{op}: {baseline} vs fastvid ({_machine(comparisons)})", fontsize=10)
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        axes.margins(x=0.15)
        paths.append(_save(figure, plt, folder, f"time-{_file_name(op)}.png"))
    return paths


def speedups(rows: List[dict]) -> Tuple[Dict[Tuple[str, str], Dict[str, float]], Dict[Tuple[str, str], float]]:
    """({(op, case): {platform: native / fastvid time}}, {(op, case): target speedup}) over ``rows``;
    within a platform the newest row of each case counts."""
    groups: Dict[str, List[dict]] = {}
    for row in rows:
        groups.setdefault(platform(row), []).append(row)
    ratios: Dict[Tuple[str, str], Dict[str, float]] = {}
    targets: Dict[Tuple[str, str], float] = {}
    for name, group in sorted(groups.items()):
        for c in _time_comparisons(_newest_per_case(group)):
            if c.ratio is None:
                continue
            key = (c.op, _case_label(c, with_isa=False))  # the platform is the bar, not the case
            ratios.setdefault(key, {})[name] = c.ratio
            limit = target_value(c.target, c.native["median"]) if c.target else None
            if limit:
                targets[key] = c.native["median"] / limit
    return ratios, targets


def plot_speedups(rows: List[dict], folder: str) -> Optional[str]:
    """native / fastvid time per case, one bar per platform (device, isa); target speedups as ticks."""
    plt = _matplotlib()
    ratios, targets = speedups(rows)
    if not ratios:
        return None
    platforms = sorted({name for per_platform in ratios.values() for name in per_platform})
    cases = list(ratios)
    figure, axes = plt.subplots(figsize=(9, 1.2 + 0.3 * len(cases) * max(1, len(platforms))))
    height = 0.8 / len(platforms)
    for k, name in enumerate(platforms):
        values = [ratios[case].get(name, 0.0) for case in cases]
        offsets = [i - 0.4 + height * (k + 0.5) for i in range(len(cases))]
        axes.barh(offsets, values, height, label=name)
    target_label = "target speedup"
    for i, case in enumerate(cases):
        if case in targets:
            axes.plot([targets[case]] * 2, [i - 0.45, i + 0.45], color="#d62728", linewidth=2, label=target_label)
            target_label = None
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(cases)), [f"{op}: {label}" for op, label in cases], fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("speedup = native time / fastvid time (> 1: fastvid faster)")
    axes.set_title("fastvid speedup per case and platform", fontsize=10)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.margins(x=0.1)
    return _save(figure, plt, folder, "speedup.png")


def _newest_per_case(rows: List[dict]) -> List[dict]:
    latest = {}
    for row in rows:
        latest[(row["op"], row["shape"], row["dtype"], row["mode"], row["metric"], row["provider"])] = row
    return list(latest.values())


def _machine(comparisons: List[report.Comparison]) -> str:
    machines = {r.get("machine", "?") for c in comparisons for r in (c.native, c.fastvid) if r}
    return ", ".join(sorted(machines))


def _save(figure, plt, folder: str, name: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    figure.savefig(path, dpi=110, bbox_inches="tight")  # room for long case labels and the legend
    plt.close(figure)
    return path


def plot(rows: List[dict], folder: str, speedup_rows: Optional[List[dict]] = None) -> List[str]:
    """Every chart: time charts of ``rows``, the speedup chart of ``speedup_rows`` (default ``rows``).
    Returns the written paths."""
    paths = plot_times(rows, folder)
    speedup = plot_speedups(rows if speedup_rows is None else speedup_rows, folder)
    return paths + ([speedup] if speedup else [])


__all__ = ["platform", "target_value", "speedups", "plot_times", "plot_speedups", "plot"]
