"""Process-level CPU memory tuning for the long CPU jobs (QAT, `gemma-mobile eval`).

Why by hand: PyTorch's CPU tensors come from glibc `malloc`, which serves every block above its mmap threshold
(at most 32 MiB) with a fresh `mmap` and returns it with `munmap` on free. QAT of Gemma 3 270M allocates and
frees hundreds of such blocks per step (262144 x 640 f32 tables, [2, 256, 262144] logits and their gradients), so
every step faults its whole working set in again, page by page, and the kernel zeroes each page. On the 2-vCPU
Zen 5 VM (2026-12-03) that was 4.7 M minor faults and 69 s of system time per QAT step (58 s wall) vs 87 k faults,
3 s and 13 s wall with the setting below — same numerics, only where freed memory goes. vLLM's CPU docs answer the
same problem with an LD_PRELOADed tcmalloc; nothing in our pinned environment ships one, and glibc's own `mallopt`
needs no extra package.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_MAX = -4
_done = False


def retain_freed_memory() -> bool:
    """Make glibc serve large blocks from its heap and keep freed memory for reuse (no mmap per block, no trim):
    `mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, -1)` (glibc stores the int as a size_t: SIZE_MAX, never
    trim; the earlier 2^31 - 1 still trimmed whenever a step freed more than 2 GiB at the top of the heap, which a
    270M QAT step did: 262 k - 786 k page faults per step). The process's RSS then stays near its peak.
    Idempotent; returns False (and changes nothing) where the C library is not glibc."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on (no library search)
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):
            raise AttributeError("not glibc")
    except (OSError, AttributeError) as e:
        logger.debug("malloc tuning skipped (%s)", e)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    if not ok:
        raise RuntimeError("glibc mallopt refused M_MMAP_MAX / M_TRIM_THRESHOLD")
    _done = True
    logger.debug("glibc malloc: large blocks from the heap, freed memory kept for reuse")
    return True
