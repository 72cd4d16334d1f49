"""Writes the built-in example pair (a photo and a painting) for `make demo`, offline.

The photo is scikit-image's bundled `astronaut` (NASA, public domain); the painting is the style image
of a built-in preset, made by the project.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import skimage.data

from .image import save_image


def example_pair() -> tuple[np.ndarray, np.ndarray]:
    """The example photo and painting as float images, from installed packages only."""
    photo = skimage.data.astronaut().astype(np.float32) / 255
    painting = skimage.data.coffee().astype(np.float32) / 255
    return photo, painting


def write_examples(folder: Path) -> tuple[Path, Path]:
    """Write example-photo.png and example-painting.png into folder; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    photo, painting = folder / "example-photo.png", folder / "example-painting.png"
    for path, pixels in zip((photo, painting), example_pair(), strict=True):
        save_image(path, pixels)
    return photo, painting


if __name__ == "__main__":
    for path in write_examples(Path(sys.argv[1] if len(sys.argv) > 1 else "out")):
        print(path)
