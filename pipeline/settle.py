"""When a dropped file is complete: its size, mtime and inode unchanged for the settle time."""

from __future__ import annotations

import os
from pathlib import Path

Stamp = tuple[int, int, int]


def stamp(path: Path) -> Stamp | None:
    """What changes while a file is written or replaced; None once it is gone."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns, info.st_ino


class Settler:
    """Tracks files seen in the inbox and says which have stayed unchanged for `settle` seconds."""

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self._seen: dict[Path, tuple[Stamp, float]] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, path: Path, now: float) -> None:
        """Start watching a path (a no-op if it is already watched; ready() notices changes)."""
        if path not in self._seen and (first := stamp(path)) is not None:
            self._seen[path] = (first, now)

    def ready(self, now: float) -> list[Path]:
        """Paths unchanged for the settle time, in the order first seen; they are no longer watched."""
        settled = []
        for path, (before, since) in list(self._seen.items()):
            current = stamp(path)
            if current is None:
                del self._seen[path]
            elif current != before:
                self._seen[path] = (current, now)
            elif now - since >= self.settle:
                del self._seen[path]
                settled.append(path)
        return settled
