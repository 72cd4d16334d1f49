"""Helpers shared by the batch tests (local and Ray engines): tiny inputs, tiny options, reading outputs."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from conftest import make_photo, save_png
from PIL import Image

from stylekit.batch import Item, Outcome

PRESET = "woodcut"  # a built-in preset, so no test writes into the shared config folder


def tiny(weights_file: Path) -> dict[str, object]:
    """Option overrides that style an image in a moment on the test weights, identically anywhere."""
    return {"weights": str(weights_file), "steps": 2, "scales": 1, "device": "cpu", "targets": "torch"}


def tiny_flags(weights_file: Path) -> list[str]:
    """The same overrides as CLI flags."""
    return [f"--{key}={value}" for key, value in tiny(weights_file).items()]


def at_outcome(number: int, action: Callable[[], object],
               seen: list[Outcome] | None = None) -> Callable[[Outcome], None]:
    """An on_outcome callback that notes each outcome (in `seen`, if given) and runs action once the
    number-th has come: something that happens to a batch while it runs."""
    noted: list[Outcome] = [] if seen is None else seen

    def note(outcome: Outcome) -> None:
        noted.append(outcome)
        if len(noted) == number:
            action()
    return note


def make_inputs(folder: Path, count: int = 8, sides: Sequence[int] = ()) -> list[Path]:
    """img0.png … as small photos, 32 px unless `sides` gives the first ones another size."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [*sides, *[32] * (count - len(sides))]
    return [save_png(folder / f"img{i}.png", make_photo(side, side, seed=i)) for i, side in enumerate(sizes)]


def output_name(source: Path, suffix: str = ".png") -> str:
    """The output file name a batch gives a source (a PNG, or in the format `suffix` names)."""
    return f"{source.stem}.{PRESET}{suffix}"


def stamps(out: Path) -> dict[str, int]:
    """Every file in an output folder (hidden ones too) with its modification time in ns."""
    return {path.name: path.stat().st_mtime_ns for path in out.iterdir()}


def pixels(path: Path) -> np.ndarray:
    """A PNG's 8-bit RGB pixels."""
    return np.asarray(Image.open(path).convert("RGB"))


def once_each(outcomes: Sequence[Outcome]) -> Counter:
    """How often each input appears among the outcomes."""
    return Counter(outcome.item.source for outcome in outcomes)


def batch_process(inputs: Path, out: Path, weights_file: Path) -> subprocess.Popen:
    """`stylekit batch` in a process of its own, as a second user would start it (stderr piped)."""
    return subprocess.Popen([sys.executable, "-m", "stylekit.cli", "batch", str(inputs), "--preset", PRESET,
                             "--out", str(out), *tiny_flags(weights_file)],
                            stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def claimed_elsewhere(item: Item) -> Iterator[subprocess.Popen]:
    """Another process holding a batch's claim on an item (as a run styling it does), killed at the end."""
    script = ("import sys, time; from pathlib import Path; from stylekit.batch import Item, claim; "
              "claim(Item(Path(sys.argv[1]), Path(sys.argv[2]))); print('claimed', flush=True); "
              "time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", script, str(item.source), str(item.output)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "claimed\n"
        yield process
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
