"""fastvid's cache of big CPU blocks (csrc/cpu_block_cache.h): the ops' CPU results, layout copies and scratch
of 256 KiB or more come from blocks freed earlier instead of fresh memory the OS faults in page by page.
``FASTVID_CPU_BLOCK_CACHE_MB`` (read at the cache's first use) bounds the bytes kept while unused
(default 1024; 0 turns the cache off)."""
from __future__ import annotations

import torch

from . import _backend


def empty_cpu_cache() -> None:
    """Return every CPU block fastvid keeps unused to the system (blocks in use stay), like
    ``torch.cuda.empty_cache()``."""
    if _backend.cpu_kernels():
        torch.ops.fastvid._cpu_block_cache_release()


def cpu_block_cache_info() -> dict:
    """``cpu_block_cache_limit_bytes`` (0: off) and ``cpu_block_cache_bytes`` (kept unused now), for
    :func:`fastvid.info`."""
    if not _backend.cpu_kernels():
        return {"cpu_block_cache_limit_bytes": None, "cpu_block_cache_bytes": None}
    limit, kept, _hits, _misses = torch.ops.fastvid._cpu_block_cache_stats()
    return {"cpu_block_cache_limit_bytes": limit, "cpu_block_cache_bytes": kept}
