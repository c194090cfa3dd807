"""Host (CPU) memory behaviour of the process that runs the model on the CPU.

Owns one setting: glibc's malloc returns every freed block above its mmap threshold (a few MB)
to the kernel, so each prefill's activations and each decode step's KV gathers are fresh mappings
that page-fault on first touch (4096 faults per 16 MB). On the 2-core CPU, a 16k-token prefill of
the 105M bench model ran at ~410 tok/s that way and ~580 tok/s with this setting
(`RADIXLM_KEEP_FREED_HOST_MEMORY=0|1 python -m radixlm.bench_one_batch --model-path
models/bench-qwen2-medium --batch-size 64 --input-len 256 --output-len 16`, alternated).
`keep_freed_host_memory()` raises the mmap and trim thresholds with
`mallopt` so freed blocks stay in the heap and are reused by the next step; PyTorch's CPU
inference guide gets the same effect by preloading jemalloc or tcmalloc. It changes how memory is
recycled, not what is computed. A no-op off glibc and when `RADIXLM_KEEP_FREED_HOST_MEMORY=0`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap
_TRIM_THRESHOLD = (1 << 31) - 1  # never give the heap's top back to the kernel
_applied = False


def keep_freed_host_memory() -> bool:
    """Applies the thresholds once per process; returns whether they are in effect."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("RADIXLM_KEEP_FREED_HOST_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if ok:
        _applied = True
        logger.debug("glibc malloc keeps freed blocks (mmap threshold %d, trim threshold %d)",
                     _MMAP_THRESHOLD, _TRIM_THRESHOLD)
    return ok
