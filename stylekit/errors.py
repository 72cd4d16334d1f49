"""User-facing failures: one exception type whose message is a single printable line."""

import errno

DISK_REFUSALS = {errno.ENOSPC: "full", errno.EDQUOT: "over its quota", errno.EROFS: "read-only"}
"""The errors by which a disk refuses every file, not one image's, with what they say about the disk."""


class StylekitError(Exception):
    """A failure caused by the user's input or environment; the CLI prints its message alone."""


class UsageError(StylekitError):
    """Arguments that cannot go together, or one missing: exit code 2, as click's own usage errors."""


class NotEnoughMemory(StylekitError, MemoryError):
    """A run refused before it starts because it would not fit into free memory; a MemoryError too,
    so that callers which retry out-of-memory failures at a smaller size retry it the same way."""

    def __init__(self, message: str, long_side: int | None = None) -> None:
        super().__init__(message)
        self.long_side = long_side  # the largest long side that fits, so a retry need not guess


class Cancelled(Exception):
    """Raised by a progress callback to stop a running job; the caller decides what that means."""


def printable(text: str) -> str:
    """Text safe to show on one line (a file name, a preset name): control and undecodable
    characters become '?'."""
    return "".join(c if c.isprintable() else "?" for c in text)


def one_line(error: BaseException, limit: int = 160) -> str:
    """An exception's first line, shortened, for a user message (its type name when it has no text)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:limit]


def disk_refusal(error: BaseException) -> OSError | None:
    """The disk-wide OSError (full, over quota, read-only) behind a failure to write, if it is one."""
    cause = error if isinstance(error, OSError) else error.__cause__
    return cause if isinstance(cause, OSError) and cause.errno in DISK_REFUSALS else None
