"""Files written whole or not at all: a hidden temporary name beside the target, fsync, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import StylekitError


@contextlib.contextmanager
def replacing(target: str | os.PathLike, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed over target, else removed.

    exclusive: linked in only if target does not exist yet (FileExistsError otherwise), so of two
    processes creating the same file exactly one wins, and readers still never see it half written.
    """
    target = Path(target)
    temp = target.with_name(f".{name_start(target.name)}.{secrets.token_hex(4)}.tmp")
    try:
        yield temp
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(temp, target)
        else:
            os.replace(temp, target)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


def name_start(name: str, limit: int = 64) -> str:
    """A file name's first `limit` bytes, for a name made from it that must still fit the file system's
    255 (cut by characters, 64 of an emoji's four bytes each would not)."""
    return os.fsdecode(os.fsencode(name)[:limit])


def write_bytes(target: str | os.PathLike, data: bytes, exclusive: bool = False, mode: int = 0o666) -> None:
    """Replace target's content with data atomically (readers see the old file or the new one);
    exclusive: create it only if it does not exist yet (see replacing). mode (less the umask) is the
    file's from its first byte: 0o600 keeps a secret from ever being readable by others."""
    with replacing(target, exclusive) as temp:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)


def write_json(target: str | os.PathLike, data: object) -> None:
    """Write indented UTF-8 JSON atomically (reports, job records, status files); text that UTF-8
    cannot hold (a file name's undecodable bytes) is written as \\u escapes, which JSON keeps."""
    try:
        text = json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(data, indent=2).encode("ascii")
    write_bytes(target, text + b"\n")


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """StylekitError unless a file can be created in folder (read-only mounts, permissions, full
    disks): checked before the work that would otherwise be lost when its result cannot be saved."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".stylekit-check-"):
            pass
    except OSError as exc:
        raise StylekitError(f"cannot write into {what} '{folder}' ({exc.strerror or exc})") from None
