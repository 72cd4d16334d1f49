"""Regenerate the built-in presets' style images: `python -m stylekit.builtin_presets.make_styles`.

Every image is procedural and seeded (so the project owns it, see LICENSES.md), except deep-field.jpg,
a crop of scikit-image's public-domain Hubble Deep Field sample. Output is 384×384, well under 200 KB.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from skimage import data as samples

SIZE = 384
HERE = Path(__file__).parent


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    """'#1b3a6b' → (27, 58, 107)."""
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def _noise(rng: np.random.Generator, cells: int, octaves: int = 3) -> np.ndarray:
    """Smooth fractal noise in [0, 1], SIZE×SIZE: bicubically enlarged random grids, summed."""
    total = np.zeros((SIZE, SIZE), np.float32)
    for octave in range(octaves):
        grid = rng.random((cells * 2**octave, cells * 2**octave)).astype(np.float32)
        layer = Image.fromarray(grid).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        total += np.asarray(layer) / 2**octave
    return (total - total.min()) / (total.max() - total.min())


def _image(pixels: np.ndarray) -> Image.Image:
    """Float H×W×3 in [0, 1] → 8-bit RGB."""
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))


def swirl(rng: np.random.Generator) -> Image.Image:
    """Thick strokes along a field of vortices: night blues with yellow-white whirls."""
    centres = [(0.3, 0.35, 1.0), (0.72, 0.6, -0.8), (0.5, 0.85, 0.6)]
    background = np.array(_rgb("#16305c")) / 255 * (0.7 + 0.5 * _noise(rng, 4)[..., None])
    image = _image(background)
    draw = ImageDraw.Draw(image)
    blues = [_rgb(c) for c in ("#1f4f8f", "#3a74b8", "#7fb0e0", "#0f2344")]
    golds = [_rgb(c) for c in ("#f2d45c", "#e8b53a", "#f7f1d0")]

    def angle(x: float, y: float) -> float:
        vx = vy = 0.0
        for cx, cy, strength in centres:
            dx, dy = x - cx, y - cy
            r2 = dx * dx + dy * dy + 0.01
            vx, vy = vx - strength * dy / r2, vy + strength * dx / r2
        return math.atan2(vy + 2.0, vx + 6.0)  # a drift, so strokes also flow across the sky

    for _ in range(2600):
        x, y = rng.random(2)
        near = min(math.hypot(x - cx, y - cy) for cx, cy, _ in centres)
        palette = golds if near < 0.13 or rng.random() < 0.08 else blues
        colour = palette[rng.integers(len(palette))]
        points = [(x * SIZE, y * SIZE)]
        for _ in range(8):
            a = angle(x, y)
            x, y = x + 0.012 * math.cos(a), y + 0.012 * math.sin(a)
            points.append((x * SIZE, y * SIZE))
        draw.line(points, fill=colour, width=int(rng.integers(3, 6)), joint="curve")
    return image


def stained_glass(rng: np.random.Generator) -> Image.Image:
    """Voronoi cells of jewel-coloured glass separated by dark lead lines."""
    seeds = rng.random((90, 2)) * SIZE
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    distances = np.stack([np.hypot(xs - sx, ys - sy) for sx, sy in seeds])
    order = np.sort(distances, axis=0)
    cell = distances.argmin(axis=0)
    palette = np.array([_rgb(c) for c in ("#9b111e", "#0f52ba", "#50c878", "#ffbf00", "#9966cc",
                                          "#e0e0d0", "#1e7b8c")]) / 255
    colours = palette[rng.integers(len(palette), size=len(seeds))]
    glow = 0.75 + 0.4 * _noise(rng, 6)[..., None]
    pixels = colours[cell] * glow
    lead = (order[1] - order[0]) < 3.5
    pixels[lead] = (0.06, 0.05, 0.05)
    return _image(pixels)


def ink_wash(rng: np.random.Generator) -> Image.Image:
    """Misty mountain ridges in diluted ink on warm paper, with a few dry brush strokes."""
    paper = np.array([0.94, 0.91, 0.85], np.float32)
    ink = np.ones((SIZE, SIZE), np.float32)
    ys = np.arange(SIZE, dtype=np.float32)[:, None]
    for layer in range(5):
        ridge = _noise(rng, 3, 2)[layer * 40 % SIZE] * SIZE * 0.35 + SIZE * (0.25 + 0.13 * layer)
        depth = np.clip((ys - ridge[None, :]) / (SIZE * 0.25), 0, 1)
        density = (0.25 + 0.15 * layer) * (1 - depth) ** 2 * (ys > ridge[None, :])
        ink *= 1 - density
    image = _image(paper * (ink * (0.9 + 0.1 * _noise(rng, 40, 1)))[..., None])
    draw = ImageDraw.Draw(image)
    for _ in range(7):
        x, y = rng.random(2) * SIZE
        points = [(x, y)]
        for _ in range(12):
            x, y = x + rng.normal(9, 3), y + rng.normal(-1.5, 2.5)
            points.append((x, y))
        draw.line(points, fill=(28, 26, 24), width=int(rng.integers(4, 10)), joint="curve")
    return image.filter(ImageFilter.GaussianBlur(0.8))


def pointillism(rng: np.random.Generator) -> Image.Image:
    """A sunny seaside painted in small dots of pure colour, complementaries scattered in."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    sky = np.stack([0.45 + 0.5 * ys, 0.65 + 0.3 * ys, 0.95 - 0.3 * ys], axis=-1)
    sea = np.stack([0.1 + 0.1 * ys, 0.45 + 0.2 * ys, 0.6 - 0.1 * ys], axis=-1)
    grass = np.stack([0.35 + 0.2 * xs, 0.6 + 0.1 * ys, 0.15 + 0.0 * xs], axis=-1)
    scene = np.where((ys < 0.45)[..., None], sky, np.where((ys < 0.7)[..., None], sea, grass))
    sun = np.hypot(xs - 0.7, ys - 0.2) < 0.08
    scene[sun] = (1.0, 0.85, 0.3)
    image = Image.new("RGB", (SIZE, SIZE), (246, 240, 226))
    draw = ImageDraw.Draw(image)
    accents = [_rgb(c) for c in ("#ff7f2a", "#d62f6b", "#ffe14d", "#4d7fff")]
    for _ in range(9000):
        x, y = rng.random(2) * SIZE
        if rng.random() < 0.2:
            colour = accents[rng.integers(len(accents))]
        else:
            base = scene[int(y), int(x)] + rng.normal(0, 0.06, 3)
            colour = tuple(int(v) for v in np.clip(base, 0, 1) * 255)
        r = rng.uniform(1.8, 3.6)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return image


def cubist(rng: np.random.Generator) -> Image.Image:
    """Overlapping shaded shards in earth tones with dark contours, some of them hatched."""
    image = Image.new("RGB", (SIZE, SIZE), _rgb("#b8894a"))
    palette = [_rgb(c) for c in ("#6b4a2b", "#5a6e7f", "#7d7a48", "#d9c9a3", "#2c2a28", "#a0522d",
                                 "#c8a165")]
    for _ in range(70):
        cx, cy = rng.normal(SIZE / 2, SIZE / 4, 2)
        corners = int(rng.integers(3, 6))
        angles = np.sort(rng.random(corners)) * 2 * math.pi
        radius = rng.uniform(30, 120)
        polygon = [(cx + radius * math.cos(a) * rng.uniform(0.5, 1),
                    cy + radius * math.sin(a) * rng.uniform(0.5, 1)) for a in angles]
        mask = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(mask).polygon(polygon, fill=255)
        shade = np.linspace(0.7, 1.2, SIZE, dtype=np.float32)
        shade = shade[None, :] if rng.random() < 0.5 else shade[:, None]
        fill = np.array(palette[rng.integers(len(palette))], np.float32) / 255
        shard = _image(np.broadcast_to(fill * shade[..., None], (SIZE, SIZE, 3)))
        if rng.random() < 0.3:
            hatch = ImageDraw.Draw(shard)
            for offset in range(-SIZE, SIZE, 7):
                hatch.line([(offset, 0), (offset + SIZE, SIZE)], fill=(40, 34, 30), width=1)
        image.paste(shard, (0, 0), mask)
        ImageDraw.Draw(image).polygon(polygon, outline=(30, 26, 22), width=3)
    return image


def woodcut(rng: np.random.Generator) -> Image.Image:
    """Black-and-white carved lines following a rolling landscape, with solid ink masses."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    field = 1.6 * ys + 0.5 * _noise(rng, 3, 2) + 0.15 * np.sin(6 * xs)
    stripes = np.sin(2 * math.pi * 16 * field) > (0.6 * _noise(rng, 5, 2) - 0.3)
    mass = _noise(rng, 4, 2)
    black = np.where(mass > 0.72, True, np.where(mass < 0.22, False, stripes))
    paper, ink = np.array([0.96, 0.94, 0.88]), np.array([0.08, 0.07, 0.07])
    return _image(np.where(black[..., None], ink, paper))


def deep_field(rng: np.random.Generator) -> Image.Image:
    """A crop of the Hubble Deep Field (scikit-image sample, NASA, public domain)."""
    sky = Image.fromarray(samples.hubble_deep_field())
    return sky.crop((300, 200, 812, 712)).resize((SIZE, SIZE), Image.Resampling.LANCZOS)


STYLES: dict[str, tuple[Callable[[np.random.Generator], Image.Image], int]] = {
    "swirl.jpg": (swirl, 1), "stained-glass.jpg": (stained_glass, 2), "ink-wash.jpg": (ink_wash, 3),
    "pointillism.jpg": (pointillism, 4), "cubist.jpg": (cubist, 5), "woodcut.png": (woodcut, 6),
    "deep-field.jpg": (deep_field, 7),
}


def main() -> None:
    """Write every style image next to this script."""
    for name, (make, seed) in STYLES.items():
        image = make(np.random.default_rng(seed))
        path = HERE / name
        if path.suffix == ".png":
            image.save(path, optimize=True)
        else:
            image.save(path, quality=88, optimize=True)
        print(f"{path.name}: {image.size[0]}×{image.size[1]}, {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
