"""Progress callbacks for the terminal: a bar with ETA for people, JSON lines for programs."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


def json_lines(stream: TextIO = sys.stdout) -> ProgressCallback:
    """A callback printing one JSON event per loss evaluation, flushed so readers see it at once."""
    def callback(progress: Progress) -> None:
        stream.write(json.dumps(progress_event(progress)) + "\n")
        stream.flush()
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
