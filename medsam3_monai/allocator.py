"""Keep freed large buffers in the process for reuse (glibc), instead of returning them to the system.

Every 1008-px item of the data path allocates a few fresh 12 MB float tensors (the resized image, its SAM3
normalisation, the batch). glibc serves buffers that large with ``mmap`` and unmaps them when freed, so each
new one is faulted in again page by page: ~3,000 page faults per buffer, a third of the resize's CPU time on a
virtual machine (``scripts/bench_data.py``). :func:`keep_freed_buffers` raises glibc's mmap threshold and trim
threshold (``mallopt``), so freed buffers return to the heap and the next item reuses pages already mapped.

The bundles call it in their ``initialize`` list, before datasets and DataLoader workers exist (forked workers
inherit it). The cost: the process keeps up to ``trim_threshold_mb`` of freed memory instead of returning it.
Elsewhere than glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_buffers"]

# glibc's malloc.h parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_buffers(mmap_threshold_mb: int = 64, trim_threshold_mb: int = 512) -> bool:
    """Serve buffers below ``mmap_threshold_mb`` from the heap and keep up to ``trim_threshold_mb`` of freed heap.

    Returns True when applied (glibc), False where there is no glibc ``mallopt``.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold_mb) << 20) == 1
    return mallopt(_M_TRIM_THRESHOLD, int(trim_threshold_mb) << 20) == 1 and applied
