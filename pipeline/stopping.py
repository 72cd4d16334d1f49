"""Stopping the watcher: SIGINT/SIGTERM ask for a clean stop; a second Ctrl-C stops at once where safe.

The clean stop waits for the engine's next loss evaluation, then hands the images in flight back to
the inbox. A second Ctrl-C (a long evaluation of a large image, or an impatient user) raises
KeyboardInterrupt at once, but only inside stretches marked abortable: the engine's work on claimed
images (which are then handed back just the same) and loading the engine before anything is claimed.
Anywhere else (moving files, the watcher's own log lines and status file) it is ignored: the clean
stop is moments away there; and once a signal has stopped the watcher, so is a Ctrl-C while the
process exits. (A library warning the engine logs during its work can be cut short, its image
handed back all the same.)
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopping:
    """The stop request (set by a signal, or by whoever called watch) and where it may cut in at once."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.by_signal = False
        self._abortable = False

    @contextmanager
    def abortable(self, allowed: bool = True) -> Iterator[None]:
        """A stretch a second Ctrl-C may cut short (allowed), or one inside it that it may not."""
        before, self._abortable = self._abortable, allowed
        try:
            yield
        finally:
            self._abortable = before

    def handle(self, signum: int, frame: object) -> None:
        """The handler: ask for a clean stop; on a second Ctrl-C, stop at once if that is safe now."""
        if signum == signal.SIGINT and self.event.is_set() and self._abortable:
            raise KeyboardInterrupt
        self.by_signal = True
        self.event.set()

    def install(self) -> None:
        """Take SIGINT and SIGTERM (again after ray.init, which puts in a SIGTERM handler of its own)."""
        for signum in SIGNALS:
            signal.signal(signum, self.handle)

    @contextmanager
    def on_signals(self) -> Iterator[None]:
        """Handle SIGINT and SIGTERM within the block, then restore what handled them before (but
        ignore Ctrl-C if a signal stopped the watcher: the process is exiting, and exits 0)."""
        previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
        self.install()
        try:
            yield
        finally:
            if self.by_signal:
                previous[signal.SIGINT] = signal.SIG_IGN
            for signum, action in previous.items():
                signal.signal(signum, action)
