"""fastvid.info(): what is compiled and usable on this machine."""
import os
import platform

import torch

from . import _backend
from ._memory import cpu_block_cache_info
from ._version import __version__


def info() -> dict:
    """A dict saying what is compiled and usable (printed by ``python -m fastvid info``)."""
    return {
        "version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_kernels": _backend.cpu_kernels(),
        "cuda_compiled": _backend.cuda_compiled(),
        "cuda_archs": list(_backend.cuda_archs()),
        "cuda_available": _backend.cuda_compiled() and torch.cuda.is_available(),
        "triton_available": _backend.triton_usable(),
        "triton_interpret": _backend.triton_interpret(),
        "backend": _backend.get_backend(),
        "threads": torch.get_num_threads(),
        "extension_error": None if _backend.EXTENSION_ERROR is None else str(_backend.EXTENSION_ERROR),
        **cpu_isa_info(),
        **cpu_cache_info(),
        **cpu_block_cache_info(),
    }


#: The CPU ISA paths, lowest first (csrc/cpu_isa.h), and the kernel families compiled for each.
CPU_ISA_PATHS = ("baseline", "avx2", "avx512")
CPU_ISA_FAMILIES = ("depthwise3d", "recurrent", "attention")
# The request as the kernels saw it: fastvid._C reads FASTVID_CPU_ISA once, when it loads (with this package),
# case and surrounding spaces ignored; a later change of the variable changes nothing, so info() does not re-read it.
_CPU_ISA_REQUEST = os.environ.get("FASTVID_CPU_ISA", "").strip().lower() or None


def cpu_isa_info() -> dict:
    """The CPU ISA path the kernels run (``cpu_isa``, and per family ``cpu_isa_<family>``: every family
    is compiled for every path, so they agree), the paths this CPU can run (``cpu_isa_supported``),
    whether it has native bf16 arithmetic (``cpu_isa_bf16``: AVX512-BF16) and the FASTVID_CPU_ISA
    request read at import (``cpu_isa_forced``)."""
    forced = _CPU_ISA_REQUEST
    if not _backend.cpu_kernels():
        return {"cpu_isa": None, "cpu_isa_supported": [], "cpu_isa_bf16": None, "cpu_isa_forced": forced}
    ops = torch.ops.fastvid
    active, best = ops._cpu_isa(), ops._cpu_isa_supported()
    return {
        "cpu_isa": active,
        "cpu_isa_supported": list(CPU_ISA_PATHS[:CPU_ISA_PATHS.index(best) + 1]),
        "cpu_isa_bf16": ops._cpu_isa_bf16(),
        "cpu_isa_forced": forced,
        **{f"cpu_isa_{family}": active for family in CPU_ISA_FAMILIES},
    }


def cpu_cache_info() -> dict:
    """The data cache sizes in bytes the CPU kernels' cache rules go by, as the OS reports them for CPU 0
    (Linux's sysfs, else glibc's sysconf): ``cpu_l2_bytes`` (one core's L2) and
    ``cpu_last_level_cache_bytes`` (the L3 that core shares; on a VM the host's as the guest sees it,
    shared with other tenants); 0 where the OS does not say, None without CPU kernels."""
    if not _backend.cpu_kernels():
        return {"cpu_l2_bytes": None, "cpu_last_level_cache_bytes": None}
    l2, last_level = torch.ops.fastvid._cpu_cache_bytes()
    return {"cpu_l2_bytes": l2, "cpu_last_level_cache_bytes": last_level}
