"""Keep the C heap from holding on to freed activation memory during CPU training.

glibc serves an allocation above its mmap threshold (128 KiB) with its own mapping, returned to the system when
freed, but it raises the threshold to the size of every such block that is freed, up to 32 MiB. After the first
training step nearly every activation (1-30 MiB) therefore comes from the heap, where blocks still alive (a layer's
saved input, a gradient) pin the freed ones around them: a LoRA step of a 135M model at batch 2 peaked at 1.6 GB
instead of 1.0 GB. Fixing the threshold turns the adjustment off, so large tensors keep going back to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, now fixed

_done = False


def fix_malloc_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at its initial value (once per process); False where there is no glibc."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not _done:
        logger.debug("mallopt(M_MMAP_THRESHOLD) failed; the heap may keep freed activations")
    return _done
