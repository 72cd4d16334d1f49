"""What a run will take in memory and what the machine has free, so a run too large is refused at once.

Linux over-commits memory: a CPU run at `--size 4000` on a 23 GB machine never saw a MemoryError,
the kernel's OOM killer ended it minutes in (exit 137, no message). Knows bytes, /proc/meminfo, memory
cgroups and torch's CUDA memory counters only; the figures are measured (docs/benchmarks.md, "Memory").
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

PIXEL_BYTES = {"cpu": 4608, "cpu-lean": 3328, "cuda": 1536}
"""Peak bytes per pixel of the batch besides L-BFGS's pairs, by how a run holds memory: the network's
saved activations, the backward's transients, the targets' pass and, on the CPU, the freed blocks kept
for reuse (heap.py). Measured on the CPU with ONNX targets: 3.6–3.9 KB (up to 4.4 KB in other runs),
2.6–2.85 KB with freed blocks handed back to the kernel ("cpu-lean", ~20% slower); on a GPU up to
1.5 KB."""
STYLE_PIXEL_BYTES = 1152
"""Peak bytes per pixel of a style image's pass to its targets (forward only, before the optimisation,
so never at the same time as the run's own peak). Measured on the CPU at 1.2 and 4.9 Mpx: 0.9–1.0 KB
with torch's targets, 1.1 KB with ONNX's."""
PAIR_PIXEL_BYTES = 2 * 3 * 4  # an L-BFGS pair: a step and a gradient change, 3 fp32 values per pixel
RUN_BYTES = 512 << 20  # the rest: the style images' targets, the result's copies, allocator slack
HEADROOM = 1.1  # a run counts as fitting only with a tenth to spare (the estimate is not exact)
GIB = 1 << 30


def available_bytes(device: torch.device) -> int | None:
    """Memory a run can still take on `device`; None where that cannot be told (a CPU off Linux, MPS)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    rooms = (_proc_bytes("/proc/meminfo", "MemAvailable:"), cgroup_room())
    return min((room for room in rooms if room is not None), default=None)


# Per cgroup version: where its memory controller is mounted below the root, and its limit, usage and
# reclaimable page cache (a memory.stat key)
_CGROUP_FILES = {"v2": ("", "memory.max", "memory.current", "inactive_file"),
                 "v1": ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def cgroup_room(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """What this process's memory cgroup and its parents still allow, the tightest of them; None where
    none sets a limit. Inside a container /proc/meminfo shows the host's memory, and a run that
    passes it is killed at the container's limit."""
    try:
        with open(proc, encoding="utf-8") as lines:
            entries = [line.rstrip("\n").split(":", 2) for line in lines]
    except OSError:
        return None
    rooms = []
    for entry in entries:
        if len(entry) != 3:
            continue
        version = "v2" if entry[:2] == ["0", ""] else "v1" if "memory" in entry[1].split(",") else None
        if version is None:
            continue
        mount, *names = _CGROUP_FILES[version]
        base = Path(root, mount)
        folder = base / entry[2].lstrip("/")  # missing where the container's mount is its own cgroup
        for place in (folder, *folder.parents):
            rooms.append(_cgroup_limit_room(place, *names))
            if place == base:
                break
    return min((room for room in rooms if room is not None), default=None)


def _cgroup_limit_room(folder: Path, limit_name: str, usage_name: str, cache_key: str) -> int | None:
    """A cgroup's limit less its usage, its reclaimable page cache counted free; None without a limit."""
    try:
        limit = (folder / limit_name).read_text(encoding="ascii").strip()
        if limit == "max" or int(limit) >= 1 << 62:  # v1 says "no limit" with a page-rounded 2⁶³ − 1
            return None
        usage = int((folder / usage_name).read_text(encoding="ascii"))
        stat = dict(line.split() for line in (folder / "memory.stat").read_text(encoding="ascii").splitlines()
                    if line.strip())
        return max(0, int(limit) - usage + int(stat.get(cache_key, 0)))
    except (OSError, ValueError):
        return None


def _proc_bytes(path: str, key: str) -> int | None:
    """A "key: N kB" line of a Linux /proc file in bytes; None where there is no such file or line."""
    try:
        with open(path, encoding="ascii") as lines:
            for line in lines:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak(device: torch.device) -> None:
    """Start counting a run's peak afresh: a server or a hot folder runs many, and each reports its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        try:  # Linux: "5" resets the process's peak resident size (VmHWM) and nothing else
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
                clear_refs.write("5")
        except OSError:
            pass  # elsewhere the peak is the process's since its start


def peak_bytes(device: torch.device) -> int:
    """The peak since reset_peak: the CUDA allocator's high-water mark on a GPU, resident size on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = _proc_bytes("/proc/self/status", "VmHWM:")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def needed_bytes(pixels: int, footprint: str, pairs: int) -> int:
    """The peak of a run on a batch of `pixels` keeping `pairs` L-BFGS pairs, headroom included."""
    return int(HEADROOM * (RUN_BYTES + pixels * (PIXEL_BYTES[footprint] + pairs * PAIR_PIXEL_BYTES)))


def pairs_that_fit(pixels: int, footprint: str, available: int) -> int:
    """How many L-BFGS pairs fit beside the rest of a run on `pixels` (below 0: not even without any)."""
    return int((available / HEADROOM - RUN_BYTES - pixels * PIXEL_BYTES[footprint])
               // (pixels * PAIR_PIXEL_BYTES))


def pixels_that_fit(footprint: str, available: int, pairs: int) -> int:
    """The largest batch, in pixels, whose run with `pairs` pairs fits into `available` bytes."""
    return max(0, int((available / HEADROOM - RUN_BYTES)
                      // (PIXEL_BYTES[footprint] + pairs * PAIR_PIXEL_BYTES)))


def style_pixels_that_fit(available: int) -> int:
    """The largest style image, in pixels, whose targets' pass fits into `available` bytes."""
    return max(0, int((available / HEADROOM - RUN_BYTES) // STYLE_PIXEL_BYTES))
