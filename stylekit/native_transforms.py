"""The C Winograd transforms (winograd_transforms.c): compiled with the system's C compiler on first
use, cached per source, compiler and CPU, and loaded with ctypes. Where that cannot happen (no
compiler, a failed build, STYLEKIT_NATIVE=0) `transforms()` is None and winograd.py keeps torch's.
Knows files and compilers, nothing about tensors.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from .atomic import replacing
from .weights_cache import cache_dir

SOURCE = Path(__file__).with_name("winograd_transforms.c")
# Tuned for the machine it runs on first; plain -O3 where the compiler refuses those (not x86).
FLAG_SETS = (("-O3", "-march=native", "-mprefer-vector-width=512"), ("-O3",))
# Each first tried with this where the process runs GNU OpenMP already (see runs_libgomp): the
# transforms then share torch's two threads, 437 → 393 ms per evaluation at 256×192 on two cores.
OPENMP = ("-fopenmp",)
SWITCH = "STYLEKIT_NATIVE"  # "0": neither build nor load; torch's transforms everywhere
BUILD_SECONDS = 120


@functools.cache
def transforms() -> ctypes.CDLL | None:
    """The loaded library with its two functions declared, or None (tried once per process)."""
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if os.environ.get(SWITCH) == "0" or compiler is None:
        return None
    for flags in flag_sets():
        try:
            return _declared(_loaded(built(compiler, flags), compiler, flags))
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def flag_sets() -> list[tuple[str, ...]]:
    """FLAG_SETS in the order to try them, each with OPENMP first where that shares torch's threads."""
    openmp = runs_libgomp()
    return [variant for flags in FLAG_SETS for variant in ((flags + OPENMP,) if openmp else ()) + (flags,)]


def runs_libgomp() -> bool:
    """Whether this process has GNU OpenMP loaded already (torch's own libgomp.so.1, on Linux).

    A library built with -fopenmp needs libgomp.so.1, which the loader then finds loaded and shares:
    one runtime, one set of worker threads. Anywhere else (no such file mapped: macOS, a torch on
    Intel's or LLVM's OpenMP) it would start a second runtime whose threads fight torch's for the cores.
    """
    try:
        with open("/proc/self/maps") as handle:
            return any(line.rstrip().endswith("/libgomp.so.1") for line in handle)
    except OSError:
        return False


def _loaded(path: Path, compiler: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    """The cached library, built afresh once if it will not load (a file cut short, say)."""
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return ctypes.CDLL(str(built(compiler, flags)))


def built(compiler: str, flags: tuple[str, ...]) -> Path:
    """The shared library for this source, compiler, flags and CPU, compiled unless cached."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]
    suffix = {"win32": ".dll", "darwin": ".dylib"}.get(sys.platform, ".so")
    target = cache_dir() / "native" / f"winograd-{key}{suffix}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with replacing(target) as temp:
            subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", str(temp), str(SOURCE)],
                           check=True, capture_output=True, timeout=BUILD_SECONDS)
    return target


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and instruction-set flags where Linux says."""
    try:
        with open("/proc/cpuinfo") as handle:
            lines = [line for line in handle if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _declared(library: ctypes.CDLL) -> ctypes.CDLL:
    """Argument types of winograd_input(x, tiles, n, h, w, c, tw, row0, row1, threads) and
    winograd_output(products, out, bias, n, h, w, c, tw, row0, row1, threads); both return 0 or 1
    (no memory). `threads` counts only where the library was built with OPENMP."""
    sizes = [ctypes.c_int64] * 7
    library.winograd_input.argtypes = [ctypes.c_void_p] * 2 + sizes + [ctypes.c_int]
    library.winograd_output.argtypes = [ctypes.c_void_p] * 3 + sizes + [ctypes.c_int]
    library.winograd_input.restype = library.winograd_output.restype = ctypes.c_int
    return library
