"""User-facing failures: one exception type whose message is a single printable line."""


class StylekitError(Exception):
    """A failure caused by the user's input or environment; the CLI prints its message alone."""


class NotEnoughMemory(StylekitError, MemoryError):
    """A run refused before it starts because it would not fit into free memory; a MemoryError too,
    so that callers which retry out-of-memory failures at a smaller size retry it the same way."""

    def __init__(self, message: str, long_side: int | None = None) -> None:
        super().__init__(message)
        self.long_side = long_side  # the largest long side that fits, so a retry need not guess


class Cancelled(Exception):
    """Raised by a progress callback to stop a running job; the caller decides what that means."""


def one_line(error: BaseException, limit: int = 160) -> str:
    """An exception's first line, shortened, for a user message (its type name when it has no text)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:limit]
