"""Helpers shared by the batch tests (local and Ray engines): tiny inputs, tiny options, reading outputs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from conftest import make_photo, save_png
from PIL import Image

from stylekit.batch import Outcome

PRESET = "woodcut"  # a built-in preset, so no test writes into the shared config folder


def tiny(weights_file: Path) -> dict[str, object]:
    """Option overrides that style an image in a moment on the test weights, identically anywhere."""
    return {"weights": str(weights_file), "steps": 2, "scales": 1, "device": "cpu", "targets": "torch"}


def tiny_flags(weights_file: Path) -> list[str]:
    """The same overrides as CLI flags."""
    return [f"--{key}={value}" for key, value in tiny(weights_file).items()]


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
