"""The results file: one JSON object per line, appended by every run (Liger-Kernel style).

Each row is one measured quantity of one provider::

    {"op": "ConvLSTM", "provider": "fastvid", "mode": "fwd_bwd", "metric": "time", "unit": "ms",
     "shape": "B=4,T=8,C=32,32x32", "median": 61.2, "p20": 60.8, "p80": 62.0, "dtype": "fp32",
     "machine": "cpu: Intel(R) Xeon(R) ...", "threads": 2, "version": "0.1.0", "torch": "2.14.1",
     "timestamp": "2026-11-21T23:50:01+00:00", "run_id": "2026-11-21T23:49:12+00:00-1234", ...}

metrics: ``time`` (ms per call), ``peak_memory`` (MiB, forward+backward), ``ops_per_step`` and
``nested_ops_per_step`` (dispatched compute ops per time step, forward; see measure.py).
Extra keys: ``shape_dims``, ``layout``, ``device``, ``torch``, ``threads``, ``run_id``, ``malloc``
('default' or 'keep', see measure.keep_freed_memory), ``other_load`` (cores other processes used
during the case), and on time rows ``rounds``, ``parity_max_rel_error``, ``minor_faults_per_call``,
``sys_ms_per_call``, ``strategy`` (fastvid's auto choice); on ops rows ``ops`` (counts per op name).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Iterable, List, Optional

import torch

DEFAULT_PATH = os.path.join("bench-results", "results.jsonl")

#: Keys every row has (the others are optional extras).
REQUIRED_KEYS = ("op", "provider", "mode", "metric", "shape", "median", "p20", "p80", "dtype", "machine",
                 "version", "timestamp")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    return f"{now()}-{os.getpid()}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device="cpu") -> str:
    """What ran the numbers: the CPU model, or the GPU name for CUDA runs."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_name()}"


def missing_keys(row: dict) -> List[str]:
    """The REQUIRED_KEYS ``row`` lacks."""
    return [k for k in REQUIRED_KEYS if k not in row]


def append(path: str, rows: Iterable[dict]) -> None:
    """Append rows to the JSONL file (parent folders are created)."""
    rows = list(rows)
    for row in rows:
        missing = missing_keys(row)
        if missing:
            raise ValueError(f"results row lacks {missing}: {row}")
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load(path: str) -> List[dict]:
    """All rows of the file, in file order (blank lines skipped)."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON row ({exc})") from None
            missing = missing_keys(row) if isinstance(row, dict) else None
            if missing is None or missing:  # JSON, but not a row the bench writes
                what = f"lacks {missing}" if missing else f"is a JSON {type(row).__name__}, not an object"
                raise ValueError(f"{path}:{number}: not a results row (it {what})")
            bad = [k for k in ("median", "p20", "p80") if k in row and not _is_number(row[k])]
            if bad or not isinstance(row["shape"], str):  # (a null median reached the table as a TypeError)
                what = f"{bad[0]} {row[bad[0]]!r} is not a number" if bad else f"shape {row['shape']!r} is not text"
                raise ValueError(f"{path}:{number}: not a results row ({what})")
            rows.append(row)
    return rows


def runs(rows: List[dict]) -> List[str]:
    """Run ids in order of first appearance."""
    seen = {}
    for row in rows:
        seen.setdefault(row.get("run_id", ""), None)
    return list(seen)


def select_run(rows: List[dict], run_id: Optional[str] = None) -> List[dict]:
    """Rows of one run: ``run_id`` ('latest' or None = the last run in the file; 'all' = the
    newest row of every (case, metric, provider, ISA path) in the file, whatever run it came from)."""
    if not rows:
        if run_id not in (None, "latest", "all"):  # (an empty file printed "(no results)" for any id, rc 0)
            raise ValueError(f"no rows with run_id {run_id!r}: the file has no rows")
        return []
    if run_id == "all":
        latest = {}
        for row in rows:
            key = (row["op"], row["shape"], row["dtype"], row["mode"], row["metric"], row["provider"], row.get("isa"))
            latest[key] = row
        return list(latest.values())
    if run_id in (None, "latest"):
        run_id = runs(rows)[-1]
    selected = [row for row in rows if row.get("run_id", "") == run_id]
    if not selected:
        raise ValueError(f"no rows with run_id {run_id!r}; runs in the file: {runs(rows)}")
    return selected
