"""Cache folders kept under a size limit by deleting the least recently used files first.

A file's last use is the later of its last write and its access time, which `mark_used` sets without
touching the modification time (callers that key on a file's version, like the ONNX sessions, keep
their keys that way).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def limit_bytes(variable: str, default_mb: float) -> int:
    """A cache's size limit: $variable in MB (0 keeps nothing), else default_mb."""
    value = os.environ.get(variable, "")
    try:
        limit = int(float(value or default_mb) * (1 << 20))
        if limit < 0:
            raise ValueError
    except (ValueError, OverflowError):  # OverflowError: inf
        _warn_unusable_limit(variable, value, default_mb)
        limit = int(default_mb * (1 << 20))
    return limit


@functools.cache
def _warn_unusable_limit(variable: str, value: str, default_mb: float) -> None:
    """Once per process and value: a long-running hot folder would otherwise repeat it per image."""
    log.warning("ignoring %s=%r (not a size in MB); using %g", variable, value, default_mb)


def mark_used(path: Path) -> None:
    """Record a read, so the file is pruned last; FileNotFoundError when it is not (or no longer) there.

    Only the access time changes: a read is not a new version of the file.
    """
    info = path.stat()
    try:
        os.utime(path, ns=(time.time_ns(), info.st_mtime_ns))
    except FileNotFoundError:
        raise
    except OSError:  # a read-only cache or another user's file is still readable: only the order suffers
        pass


def prune(folder: Path, pattern: str, limit: int, in_use_s: float = 0.0) -> None:
    """Delete the least recently used files matching pattern until the folder holds at most `limit`
    bytes of them; files used within the last `in_use_s` seconds are kept whatever their size (another
    process may be opening them right now)."""
    entries = []
    for path in folder.glob(pattern):
        try:
            info = path.stat()
        except OSError:  # another process pruned it first
            continue
        entries.append((max(info.st_mtime_ns, info.st_atime_ns), info.st_size, path))
    total = sum(size for _, size, _ in entries)
    recent = time.time_ns() - int(in_use_s * 1e9)
    for used, size, path in sorted(entries):
        if total <= limit or used > recent:  # sorted: every later file is recent too
            break
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot prune cached file %s (%s)", path, exc)
            continue  # still there: the next one goes instead
        total -= size
