"""glibc malloc settings for CPU runs, applied by the command-line entry points (importing hf_dynorm changes nothing).

glibc raises its mmap threshold as large blocks are freed, so whether a mid-size tensor comes from the heap or from
fresh mmap'd pages (which page-fault on every first touch) depends on what ran before: the same op measured 0.13 ms
or 1.6 ms in one process here, and SmolLM2-135M forward and training steps ran ~10% faster with the thresholds
pinned (benchmarks/README.md). Pinning them is what MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ do at startup.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks below 32 MiB come from the heap
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap for reuse instead of handing it back page by page
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def pin_malloc_thresholds() -> bool:
    """Pin glibc's mmap and trim thresholds for this process; True when set. Does nothing off Linux/glibc or when
    the user set either MALLOC_ variable (theirs wins)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
