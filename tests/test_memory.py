"""How much memory a run needs and how much is free: the arithmetic behind refusing a run up front."""

import sys

import pytest
import torch

from stylekit import memory

FREE = 8 << 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="free memory is read from /proc")
def test_free_memory_on_the_cpu_is_within_the_machine():
    with open("/proc/meminfo") as meminfo:
        total = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))
    assert 0 < memory.available_bytes(torch.device("cpu")) <= total


def test_a_run_needs_more_with_more_pixels_and_more_pairs():
    base = memory.needed_bytes(1 << 20, "cpu", 5)
    assert memory.needed_bytes(2 << 20, "cpu", 5) > base
    assert memory.needed_bytes(1 << 20, "cpu", 50) > base


def test_the_pairs_that_fit_do_and_one_more_does_not():
    pixels = 1024 * 768
    pairs = memory.pairs_that_fit(pixels, "cpu", FREE)
    assert memory.needed_bytes(pixels, "cpu", pairs) <= FREE < memory.needed_bytes(pixels, "cpu", pairs + 1)


def test_the_pixels_that_fit_do_and_a_row_more_does_not():
    pixels = memory.pixels_that_fit("cpu", FREE, 5)
    assert memory.needed_bytes(pixels, "cpu", 5) <= FREE < memory.needed_bytes(pixels + 1024, "cpu", 5)


def test_a_gpu_pixel_costs_less_than_a_cpu_one():
    assert memory.pixels_that_fit("cuda", FREE, 5) > memory.pixels_that_fit("cpu", FREE, 5)


def test_free_memory_of_a_device_it_cannot_read_is_unknown():
    assert memory.available_bytes(torch.device("meta")) is None
