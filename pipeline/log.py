"""The watcher's log: one line per event on stderr, readable by people or (with --log-json) by machines."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import TextIO

from stylekit.errors import printable


class EventLog:
    """Writes `time event message` lines, or one JSON object per line when as_json is set."""

    def __init__(self, as_json: bool = False, stream: TextIO | None = None) -> None:
        self.as_json = as_json
        self.stream = stream

    def __call__(self, event: str, message: str, **fields: object) -> None:
        """Log one event; fields go into the JSON object (the message already says them for people)."""
        now = datetime.now(timezone.utc).astimezone()
        if self.as_json:
            line = json.dumps({"time": now.isoformat(timespec="milliseconds"), "event": event,
                               **fields, "message": message})
        else:
            line = f"{now:%Y-%m-%d %H:%M:%S} {event:<8} {printable(message)}"
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()
