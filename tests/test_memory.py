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



def _cgroup(folder, limit: str, usage: int, cache: int = 0, version: str = "v2") -> None:
    """A memory cgroup's files as the kernel shows them (cgroup v2, or v1's names)."""
    limit_name, usage_name, cache_key = (("memory.max", "memory.current", "inactive_file") if version == "v2"
                                         else ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                               "total_inactive_file"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / limit_name).write_text(f"{limit}\n")
    (folder / usage_name).write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(f"anon {usage}\n{cache_key} {cache}\nfile_dirty 0\n")


def _room(tmp_path, cgroups: str) -> int | None:
    (tmp_path / "cgroup").write_text(cgroups)
    return memory.cgroup_room(str(tmp_path / "cgroup"), str(tmp_path / "fs"))


def test_a_containers_cgroup_v2_limit_caps_free_memory_its_page_cache_counted_free(tmp_path):
    _cgroup(tmp_path / "fs", "max", 9 << 30)
    _cgroup(tmp_path / "fs" / "app", str(4 << 30), 3 << 30, cache=1 << 29)
    assert _room(tmp_path, "0::/app\n") == (1 << 30) + (1 << 29)


def test_the_tightest_of_a_cgroup_and_its_parents_counts(tmp_path):
    _cgroup(tmp_path / "fs" / "outer", str(2 << 30), 1 << 30)
    _cgroup(tmp_path / "fs" / "outer" / "inner", "max", 1 << 30)
    assert _room(tmp_path, "0::/outer/inner\n") == 1 << 30


def test_a_cgroup_v1_limit_on_a_mount_that_is_the_containers_own_cgroup_counts(tmp_path):
    _cgroup(tmp_path / "fs" / "memory", str(6 << 30), 2 << 30, version="v1")  # the mount is /docker/abc
    assert _room(tmp_path, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n") == 4 << 30


def test_without_a_cgroup_limit_free_memory_is_the_machines(tmp_path):
    _cgroup(tmp_path / "fs" / "memory", "9223372036854771712", 1 << 30, version="v1")  # v1's "no limit"
    assert _room(tmp_path, "4:memory:/\n") is None
    assert memory.cgroup_room(str(tmp_path / "no such file")) is None
