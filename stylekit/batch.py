"""Batch styling: a folder or glob of images through one preset, each image exactly once, resumable.

Every input has a fixed output, <stem>.<preset>.<ext> in the output folder (ext from --format, as the
hot folder names its outputs), written atomically, so a file there means that image is done and a
re-run skips it; another --format gives other outputs. Images that fail are listed with their reasons
in stylekit-failed.json beside the outputs (and tried again by the next run). An engine only decides
where stylize() runs: `run_local` here, in this process; `ray_engine.engine` on a Ray cluster.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import write_json
from .engine import stylize
from .errors import StylekitError
from .image import LoadedImage, load_image, output_format, output_suffix, read_metadata, save_image
from .presets import Preset, preset_request
from .request import Result, StyleRequest, validate

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
FAILED_FILE = "stylekit-failed.json"
WARM_UP_SIDE = 32
JPEG_ALPHA_WARNING = ("JPEG has no transparency: transparent parts are flattened onto white "
                      "(--format png, webp or tif keep them)")


@dataclass(frozen=True)
class Item:
    """One input image and the output it becomes."""

    source: Path
    output: Path


@dataclass(frozen=True)
class Recipe:
    """What every image of a batch gets: the preset's request (styles decoded once), for any content."""

    preset: str
    template: StyleRequest  # its content is a placeholder; `request` puts each image in
    style_names: tuple[str, ...]
    quality: int = 95  # JPEG and WebP quality, the hot folder's default

    def request(self, content: np.ndarray) -> StyleRequest:
        """The request for one image."""
        return dataclasses.replace(self.template, content=content)


@dataclass(frozen=True)
class Outcome:
    """How one item ended: done (output written), skipped (output already there) or failed."""

    item: Item
    status: str  # "done" | "skipped" | "failed"
    reason: str | None = None
    attempts: int = 0  # engine calls made for it (a Ray worker lost mid-image makes more than one)
    seconds: float = 0.0
    worker: str = ""  # "local", or the Ray worker's host:pid
    warnings: tuple[str, ...] = ()  # what the run warned about (random weights, a slower lean run)
    content_size: tuple[int, int] = (0, 0)  # width×height of the input and of the output (when done)
    size: tuple[int, int] = (0, 0)


@dataclass
class Summary:
    """Counts for the line printed at the end, and the failures with their reasons."""

    done: int = 0
    skipped: int = 0
    failures: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        """One line for people."""
        return (f"{self.done} done, {self.skipped} skipped (already there), {len(self.failures)} failed "
                f"in {self.seconds:.1f} s")


Engine = Callable[[Recipe, Sequence[Item]], Iterator[Outcome]]
"""Styles items (none of them done yet) and yields one Outcome per item, in any order."""


def is_image_name(path: Path) -> bool:
    """Visible files with an image extension; everything else in a folder is left alone."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def discover(spec: str) -> list[Path]:
    """The images a folder (not its sub-folders), a glob (`**` recurses) or one file names, sorted."""
    path = Path(spec)
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and is_image_name(p)]
    elif glob.has_magic(spec):
        found = [Path(p) for p in glob.glob(spec, recursive=True)]
        found = [p for p in found if p.is_file() and is_image_name(p)]
    elif path.is_file():
        found = [path]
    else:
        raise StylekitError(f"no folder or file '{spec}'")
    if not found:
        raise StylekitError(f"no images in '{spec}' (looked for {', '.join(IMAGE_SUFFIXES)})")
    return sorted(found)


def plan(sources: Sequence[Path], out: Path, preset: str, out_format: str = "same") -> list[Item]:
    """Each source's output: <stem>.<preset><suffix> (see output_suffix), or
    <stem>-<hash of its path>.<preset><suffix> where that name is not this source's alone: two sources
    want it (a.jpg and a.png as PNG), or an earlier run's output there names another input in its
    metadata (a.jpg's PNG, now that a.png's default output is PNG too). A source whose plain-named
    output is already there and names it keeps it: adding a.png to a folder must not make the next
    run style a.jpg again under a new name."""
    out_dir = out.resolve()
    for source in sources:
        if source.resolve().parent == out_dir:
            raise StylekitError(f"--out '{out}' holds input images ('{source.name}'); "
                                "give the outputs a folder of their own")
    plain = [out / f"{source.stem}.{preset}{output_suffix(source, out_format)}" for source in sources]
    wanted = Counter(output.name.casefold() for output in plain)
    names = Counter(source.name.casefold() for source in sources)
    items = []
    for source, output in zip(sources, plain, strict=True):
        maker = _made_from(output)
        mine = maker == source.name and names[source.name.casefold()] == 1
        if (wanted[output.name.casefold()] > 1 or maker is not None) and not mine:
            stem = source.stem + "-" + hashlib.sha256(os.fsencode(source)).hexdigest()[:8]
            output = out / f"{stem}.{preset}{output.suffix}"
        items.append(Item(source, output))
    return items


def _made_from(output: Path) -> str | None:
    """The input file name an earlier run recorded in an output, if there is a readable one."""
    if not output.is_file():
        return None
    try:
        return read_metadata(output).get("content")
    except StylekitError:
        return None


def make_recipe(preset: Preset, overrides: dict[str, object] | None = None) -> Recipe:
    """Decode the preset's styles and check its options (with overrides) once, before any image."""
    template = preset_request(preset, np.zeros((1, 1, 3), np.float32), overrides)
    validate(template.options)
    return Recipe(preset.name, template, tuple(path.name for path in preset.style_paths))


def warm_up_request(request: StyleRequest) -> StyleRequest:
    """A one-step request on a small grey image: loads the network, shows setup errors at once."""
    blank = np.full((WARM_UP_SIDE, WARM_UP_SIDE, 3), 0.5, np.float32)
    options = request.options.replace(size=WARM_UP_SIDE, steps=1, scales=1)
    return dataclasses.replace(request, content=blank, options=options)


def failure_reason(error: BaseException) -> str:
    """One line saying why an image failed: a StylekitError's message, else the exception's type too."""
    text = str(error) if isinstance(error, StylekitError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())[:500]


def load(item: Item, recipe: Recipe) -> tuple[LoadedImage, StyleRequest]:
    """Decode one input and build its request (StylekitError when the file is not a usable image)."""
    picture = load_image(item.source)
    return picture, recipe.request(picture.rgb)


def conclude(item: Item, recipe: Recipe, picture: LoadedImage | None, value: Result | BaseException,
             attempts: int, worker: str) -> Outcome:
    """Write a result to the item's output (atomically), or turn a failure into its Outcome."""
    if isinstance(value, Result):
        assert picture is not None
        metadata = {"software": f"stylekit {__version__}", "content": item.source.name,
                    "preset": recipe.preset, "styles": list(recipe.style_names), **value.report()}
        flattened = picture.alpha is not None and output_format(item.output) == "JPEG"
        try:
            save_image(item.output, value.image, picture.alpha, metadata=metadata,
                       source_metadata=picture.source_metadata, quality=recipe.quality)
        except StylekitError as error:
            value = error
        else:
            height, width = picture.rgb.shape[:2]
            return Outcome(item, "done", attempts=attempts, seconds=value.seconds, worker=worker,
                           warnings=value.warnings + ((JPEG_ALPHA_WARNING,) if flattened else ()),
                           content_size=(width, height), size=(value.width, value.height))
    return Outcome(item, "failed", failure_reason(value), attempts=attempts, worker=worker)


def run_local(recipe: Recipe, items: Sequence[Item]) -> Iterator[Outcome]:
    """The local engine: one image after another in this process, on its device."""
    stylize(warm_up_request(recipe.template))
    for item in items:
        picture: LoadedImage | None = None
        try:
            picture, request = load(item, recipe)
            value: Result | Exception = stylize(request)
        except Exception as error:  # one bad image must not stop the batch; its reason is recorded
            value = error
        yield conclude(item, recipe, picture, value, attempts=1, worker="local")


def write_failures(out: Path, failures: Sequence[Outcome]) -> None:
    """Replace the failure record (atomically); without failures there is none."""
    path = out / FAILED_FILE
    if not failures:
        path.unlink(missing_ok=True)
        return
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = [{"input": str(o.item.source), "output": str(o.item.output), "reason": o.reason,
             "attempts": o.attempts, "worker": o.worker, "time": stamp} for o in failures]
    write_json(path, {"failed": rows})


def run_batch(out: Path, items: Sequence[Item], recipe: Recipe, engine: Engine,
              on_outcome: Callable[[Outcome], None] = lambda outcome: None) -> Summary:
    """Skip items already done, style the rest with the engine, record failures (also when stopped)."""
    started = time.perf_counter()
    summary = Summary()
    todo = []
    for item in items:
        if item.output.exists():
            summary.skipped += 1
            on_outcome(Outcome(item, "skipped"))
        else:
            todo.append(item)
    try:
        for outcome in engine(recipe, todo) if todo else ():
            if outcome.status == "done":
                summary.done += 1
            else:
                summary.failures.append(outcome)
            on_outcome(outcome)
    finally:
        summary.seconds = time.perf_counter() - started
        write_failures(out, summary.failures)
    return summary
