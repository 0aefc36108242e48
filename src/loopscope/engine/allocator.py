"""Keep freed tensor memory in the process instead of returning it to the OS after every iteration.

glibc serves large blocks (a batch's activations, say) with mmap and trims freed memory at the top
of the heap, so each iteration touches fresh pages: measured on the wide reference MLP, ~1,000 page
faults an iteration and ~20% of its time. Raising both thresholds makes the allocator reuse those
blocks. The engine process calls this once; `loopscope bench` calls it for its plain loop too, so
that its ratios measure loopscope and not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's maximum: larger blocks still come from mmap
TRIM_THRESHOLD_BYTES = 256 * 2**20  # at most this much freed memory is kept for reuse


def tune_allocator() -> bool:
    """True when the allocator took the settings (glibc on Linux); elsewhere nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
