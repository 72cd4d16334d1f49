"""Files written whole or not at all: a hidden temporary name beside the target, fsync, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed over target, else removed."""
    target = Path(target)
    temp = target.with_name(f".{target.name[:64]}.{secrets.token_hex(4)}.tmp")
    try:
        yield temp
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Replace target's content with data atomically (readers see the old file or the new one)."""
    with replacing(target) as temp:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)


def write_json(target: str | os.PathLike, data: object) -> None:
    """Write indented UTF-8 JSON atomically (reports, job records, status files)."""
    write_bytes(target, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
