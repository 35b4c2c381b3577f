"""Workaround with no public API: keep glibc from returning large freed blocks to the OS between steps.

glibc serves blocks over its mmap threshold (at most 32 MiB) with fresh mmaps and trims the heap
top, so each training step re-faults APEM's (B, S, L M K) score buffers (32 MiB at batch 1024)
page by page: measured ~25 ms per 32 MiB buffer on a 2-core VM, a quarter of APEM's step.
Raising the mmap and trim thresholds keeps freed memory in the heap (RSS stays at the peak of one
step). Python and torch expose no way to set this; glibc's own alternative, the
``GLIBC_TUNABLES``/``MALLOC_*_`` environment variables, only acts at process start, which a library
cannot control. So this calls ``mallopt`` through ctypes, process-wide, once, and only from the
trainer (serving processes never call it). ``tests/train/test_malloc_tuning.py`` fails loudly if
libc stops accepting these parameters.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
_TUNED = False


def keep_freed_memory_for_reuse() -> bool:
    """Apply once per process; True when glibc accepted both settings (False elsewhere)."""
    global _TUNED
    if _TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    accepted = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    _TUNED = accepted
    return accepted
