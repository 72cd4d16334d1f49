"""User-facing failures: one exception type whose message is a single printable line."""


class StylekitError(Exception):
    """A failure caused by the user's input or environment; the CLI prints its message alone."""


class Cancelled(Exception):
    """Raised by a progress callback to stop a running job; the caller decides what that means."""
