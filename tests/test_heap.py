"""heap.py: freed tensor memory is reused within a run and given back to the kernel after it."""

import resource

import pytest
import torch

from stylekit import heap

glibc_only = pytest.mark.skipif(heap._glibc() is None, reason="malloc settings are glibc's")
BLOCK = 96 << 20  # above glibc's default 32 MiB limit for heap blocks


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _touch_block() -> None:
    torch.ones(BLOCK // 4)  # written in full, then freed


def _faults_of_touches(count: int = 4) -> int:
    for _ in range(16):  # torch's 64-byte-aligned blocks settle into the heap within a few rounds
        _touch_block()
    before = _page_faults()
    for _ in range(count):
        _touch_block()
    return _page_faults() - before


@glibc_only
def test_a_freed_large_block_is_reused_without_page_faults():
    assert heap.keep_freed_memory()
    assert _faults_of_touches() < (BLOCK // resource.getpagesize()) // 2


@glibc_only
def test_releasing_gives_the_freed_memory_back_to_the_kernel():
    with heap.reused_memory():
        _touch_block()
        kept = _resident_bytes()
    assert kept - _resident_bytes() > BLOCK // 2


@glibc_only
def test_after_a_block_that_handed_memory_back_the_next_one_reuses_it_again():
    with heap.reused_memory():
        heap.hand_back_freed_memory()
    with heap.reused_memory():
        assert _faults_of_touches() < (BLOCK // resource.getpagesize()) // 2


def test_off_glibc_nothing_is_set_or_released(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)  # what macOS, Windows or musl give
    assert heap.keep_freed_memory.__wrapped__() is False  # uncached: the process's answer stays
    heap.release_freed_memory()  # no C library to call: returns quietly
    heap.hand_back_freed_memory()
