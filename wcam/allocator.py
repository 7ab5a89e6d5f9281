"""Process-wide glibc malloc settings that keep CPU tensors' freed memory mapped between calls.

glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh ``mmap`` and
unmaps it on free, and gives freed memory at the top of its heaps back to the kernel past a trim threshold
(128 KiB at start). A CNN's forward + backward allocates and frees hundreds of MB of activations per call,
so each call faults every page of them in again: on the project's 2-core CPU, resnet50's forward + backward
at batch 8 took 94,000-107,000 page faults and 264-309 ms of kernel CPU time per call; tuned, none, and it ran
1.33-1.47x faster (two runs of ``python bench/malloc.py``, ``bench/RESULTS.md``).

:func:`tune_malloc` changes that for the whole process, so it is an application's choice, made once at start-up
(the ``wcam`` command line does it; the library itself never does). It is glibc's ``mallopt`` through
ctypes: nothing is installed and nothing happens on other C libraries.
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

RETAIN = 1 << 30  # 1 GiB: more than a batch-8 forward + backward of the benchmark models at 224 x 224
INT_MAX = 2**31 - 1  # mallopt takes a C int
OLD_GLIBC_MMAP_CAP = 32 << 20  # older glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (64-bit: 32 MiB)


def tune_malloc(retain_bytes: int = RETAIN, single_arena: bool = True) -> bool:
    """Serve tensors below ``retain_bytes`` from malloc's heap and keep up to ``retain_bytes`` of freed memory
    mapped, instead of unmapping each large tensor on free and faulting its pages in on the next call.

    A glibc that refuses an mmap threshold above 32 MiB (older releases; 2.36 takes 1 GiB) gets 32 MiB, so
    tensors up to that size are kept. With ``single_arena`` every thread allocates from the main heap: a
    thread's own arena grows in 64 MiB heaps and maps anything larger afresh each time (measured with
    ``python bench/malloc.py --settings thresholds tuned``). Memory freed below the top of the heap is
    reused, not returned, so the process keeps roughly its peak working set mapped. Process-wide and
    lasting; call it once, before the work starts (arenas already made by other threads stay in use).
    Returns True when glibc took every setting; False on another C library or platform (nothing changed) or
    when glibc refused one (logged; the ones before it stay).
    """
    if isinstance(retain_bytes, bool) or not isinstance(retain_bytes, int):
        raise TypeError(f"retain_bytes must be an int, got {type(retain_bytes).__name__}")
    if not 0 < retain_bytes <= INT_MAX:
        raise ValueError(f"retain_bytes must be in 1..{INT_MAX} (mallopt takes a C int), got {retain_bytes}")
    if not sys.platform.startswith("linux"):
        logger.info("malloc left as it is: %s is not glibc Linux", sys.platform)
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        logger.info("malloc left as it is: the C library is not glibc")
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # the mmap threshold first: a trim threshold alone would also fix the mmap threshold at its start value
    for mmap_threshold in dict.fromkeys([retain_bytes, min(retain_bytes, OLD_GLIBC_MMAP_CAP)]):
        if mallopt(M_MMAP_THRESHOLD, mmap_threshold):
            break
    else:
        logger.warning("glibc malloc refused M_MMAP_THRESHOLD=%d; malloc left as it is", retain_bytes)
        return False
    settings = [("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, retain_bytes)]
    if single_arena:
        settings.append(("M_ARENA_MAX", M_ARENA_MAX, 1))
    for name, option, value in settings:
        if not mallopt(option, value):
            logger.warning("glibc malloc refused %s=%d; the settings before it stay", name, value)
            return False
    logger.info("glibc malloc: mmap threshold %d bytes, trim threshold %d bytes%s", mmap_threshold, retain_bytes,
                ", one arena" if single_arena else "")
    return True
