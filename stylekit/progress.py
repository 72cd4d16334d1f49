"""Progress callbacks for the terminal: a bar with ETA for people, JSON lines for programs."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TextIO

from tqdm import tqdm

from .request import Progress, ProgressCallback


def progress_event(progress: Progress) -> dict[str, object]:
    """One progress snapshot as the JSON event the CLI, server and plug-in all speak."""
    return {"event": "progress", "stage": progress.stage, "scale": progress.scale,
            "scales": progress.scales, "width": progress.width, "height": progress.height,
            "iteration": progress.iteration, "total": progress.total,
            "fraction": round(progress.fraction, 4), "loss": progress.loss,
            "elapsed": round(progress.elapsed, 3)}


def write_line(stream: TextIO | None, line: str) -> bool:
    """Write one line and flush it; False when nobody reads the stream any more (no stdout at all, a
    closed pipe such as `| head -1`), which then points at /dev/null so that exiting cannot fail on it."""
    if stream is None:
        return False
    try:
        stream.write(line + "\n")
        stream.flush()
        return True
    except (BrokenPipeError, ValueError):  # ValueError: the stream itself was closed
        with suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        return False


def json_lines(stream: TextIO | None, on_gone: Callable[[], None]) -> ProgressCallback:
    """A callback printing one JSON event per loss evaluation, flushed so readers see it at once. A
    reader that goes away ends the events, not the work (on_gone is told, once)."""
    reading = True

    def callback(progress: Progress) -> None:
        nonlocal reading
        if reading and not write_line(stream, json.dumps(progress_event(progress))):
            reading = False
            on_gone()
    return callback


@contextmanager
def progress_bar(stream: TextIO = sys.stderr) -> Iterator[ProgressCallback]:
    """A tqdm bar (with ETA) driven by progress snapshots; closed cleanly on errors too."""
    bar = tqdm(total=1, file=stream, unit="it", dynamic_ncols=True, leave=True,
               bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                          "[{elapsed}<{remaining}, {rate_fmt}]")

    def callback(progress: Progress) -> None:
        bar.total = progress.total
        bar.set_description_str(f"scale {progress.scale}/{progress.scales} "
                                f"{progress.width}×{progress.height}", refresh=False)
        if progress.loss is not None:
            bar.set_postfix_str(f"loss {progress.loss:.4g}", refresh=False)
        bar.update(progress.iteration - bar.n)

    try:
        yield callback
    finally:
        bar.close()
