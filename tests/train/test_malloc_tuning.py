"""Canary for the one ctypes workaround (apem/train/malloc_tuning.py): fails loudly if glibc changes."""

import ctypes
import sys

import pytest

from apem.train import malloc_tuning


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_glibc_still_accepts_the_thresholds() -> None:
    libc = ctypes.CDLL("libc.so.6")  # the workaround needs exactly this library and function
    assert libc.mallopt(malloc_tuning.M_MMAP_THRESHOLD, 1 << 30) == 1
    assert libc.mallopt(malloc_tuning.M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    assert malloc_tuning.keep_freed_memory_for_reuse() is True


def test_prediction_never_tunes_the_allocator() -> None:
    """Serving processes must not inherit the process-wide setting: only the trainer calls it."""
    import inspect

    from apem.inference import model_dir, predict

    for module in (predict, model_dir):
        assert "malloc" not in inspect.getsource(module)
