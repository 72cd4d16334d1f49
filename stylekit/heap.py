"""glibc's malloc set to reuse freed tensor memory instead of returning it to the kernel.

By default glibc maps every block over 32 MiB afresh and unmaps it when freed, so each loss
evaluation of a 512×384 image page-faults ~500 MiB of new, kernel-zeroed memory (its 64-channel
activations are 50 MiB each): 12–18% of the evaluation's time on two cores. Keeping such blocks in
the heap makes later evaluations reuse them. Knows the C library only; a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt's option numbers (malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks up to this size come from the heap, and are reused once freed
TRIM_THRESHOLD = 2**31 - 1  # free memory at the heap's top stays (release_freed_memory returns it)
KEEP = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
HAND_BACK = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 64 << 20))  # glibc's own, once settled


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's own C library if it is glibc (mallopt's options mean something else elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    return libc


def _set(settings: tuple[tuple[int, int], ...]) -> bool:
    """Apply mallopt settings, each even if one fails; True if all took."""
    libc = _glibc()
    return libc is not None and all([libc.mallopt(option, value) == 1 for option, value in settings])


@functools.cache
def keep_freed_memory() -> bool:
    """Once per process: serve large blocks from one heap and keep them when freed (True if set).

    One arena, so a worker thread's tensors share the main heap: a thread's own arena cannot hold
    blocks over 64 MiB and would map them afresh every time.
    """
    return _set(((M_ARENA_MAX, 1), *KEEP))


def hand_back_freed_memory() -> None:
    """Until the reused_memory block ends, blocks beyond the heap are mapped afresh and unmapped
    when freed (blocks inside it stay until release_freed_memory, which such a run calls each step).

    Why: kept blocks cost ~1 KB per pixel at the peak; a run that fits only without them trades
    the page faults (~20% of its time) for running at all.
    """
    _set(HAND_BACK)
    release_freed_memory()


def release_freed_memory() -> None:
    """Give the heap's free pages back to the kernel, so a warm server does not sit on its peak."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def reused_memory() -> Iterator[None]:
    """Freed memory is reused within the block (unless handed back) and given back to the kernel after it."""
    kept = keep_freed_memory()
    try:
        yield
    finally:
        release_freed_memory()
        if kept:
            _set(KEEP)  # the block may have handed memory back; the next one reuses again
