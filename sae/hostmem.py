"""Keep freed host memory for reuse instead of returning it to the OS every step.

A CPU training step allocates several (batch, d_sae) tensors of tens of MB. glibc's malloc serves blocks that
large with fresh ``mmap`` calls and unmaps them on free, so every step the kernel zero-fills and page-faults
them anew; with ``mmap`` off for malloc and a high trim threshold the next step reuses them already mapped
(bench/README.md gives the measured gain). The process keeps its peak heap, as a training run does anyway.
Only glibc (Linux) has these knobs; elsewhere this is a no-op. GPU tensors are unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("sae")

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: ~2 GiB of free heap kept before trimming


def reuse_freed_host_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from the heap and keep them after free; True if it took.

    Safe to call more than once. Affects allocations made after the call, in this process and in the
    processes it forks afterwards (data-loader workers)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not done:
        log.info("could not set malloc options; host memory is returned to the OS after each step")
    return done
