"""Batch styling: a folder or glob of images through one preset, each image exactly once, resumable.

Every input has a fixed output, <stem>.<preset>.<ext> in the output folder (ext from --format, as the
hot folder names its outputs), written atomically, so a file there means that image is done and a
re-run skips it; another --format gives other outputs. Before styling an image a run claims it (a
lock on a hidden file beside its output), so batches sharing an output folder never style one image
twice. Images that fail are listed with their reasons in stylekit-failed.json beside the outputs (and
tried again by the next run). A disk that refuses outputs as a whole (full, over quota, read-only) stops
the batch at the first output it refuses: no image is to blame, and a re-run resumes. An engine only
decides where stylize() runs: `run_local` here, in this process; `ray_engine.engine` on a Ray cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import name_start, write_json
from .engine import stylize
from .errors import DISK_REFUSALS, StylekitError, disk_refusal
from .image import (
    INPUT_SUFFIXES,
    LoadedImage,
    load_image,
    output_format,
    output_suffix,
    read_metadata,
    save_image,
)
from .pipeline.folders import lock_holder
from .presets import Preset, preset_request
from .request import Result, StyleRequest, validate, warm_up_request

FAILED_FILE = "stylekit-failed.json"
JPEG_ALPHA_WARNING = ("JPEG has no transparency: transparent parts are flattened onto white "
                      "(--format png, webp, avif or tif keep them)")
TAKEN = "another stylekit batch is styling it"
GONE = "it disappeared (moved by something else?)"
_claims: dict[Path, int] = {}  # output → the locked claim file this process holds for it


class Skipped(StylekitError):
    """An item that is not this run's to style after all: its reason, or "" when its output is there."""


class OutputRefused(StylekitError):
    """The output folder's disk takes no file now (full, over quota, read-only): every other output
    would be refused too, so the batch stops; its message says how to go on."""


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
    quality: int = 95  # JPEG, WebP and AVIF quality, the hot folder's default

    def request(self, content: np.ndarray) -> StyleRequest:
        """The request for one image."""
        return dataclasses.replace(self.template, content=content)


@dataclass(frozen=True)
class Outcome:
    """How one item ended: done (output written), skipped (output already there, or see `reason`) or
    failed."""

    item: Item
    status: str  # "done" | "skipped" | "failed" | "refused" (its disk refused its output: OutputRefused)
    reason: str | None = None  # why it failed or was refused, or why skipped when its output is not there
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
    skipped: int = 0  # their outputs were there already
    left: int = 0  # another batch is styling them, or they disappeared (each said as it happened)
    failures: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        """One line for people."""
        left = f", {self.left} left alone (another batch's, or gone)" if self.left else ""
        return (f"{self.done} done, {self.skipped} skipped (already there){left}, {len(self.failures)} "
                f"failed in {self.seconds:.1f} s")


Engine = Callable[[Recipe, Sequence[Item]], Iterator[Outcome]]
"""Styles items (none of them done yet) and yields one Outcome per item, in any order."""


def is_image_name(path: Path) -> bool:
    """Visible files with an image extension; everything else in a folder is left alone."""
    return not path.name.startswith(".") and path.suffix.lower() in INPUT_SUFFIXES


def discover(spec: str) -> list[Path]:
    """The images a folder (not its sub-folders), a glob (`**` recurses) or one file names, sorted; a
    file named twice (through a symlink) once, under its first name: it has one output."""
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
    _check_unwatched(spec, {p.parent for p in found} | ({path} if path.is_dir() else set()))
    if not found:
        raise StylekitError(f"no images in '{spec}' (looked for {', '.join(INPUT_SUFFIXES)})")
    unique: dict[Path, Path] = {}
    for image in sorted(found):
        unique.setdefault(image.resolve(), image)
    return list(unique.values())


def _check_unwatched(spec: str, folders: set[Path]) -> None:
    """Refuse inputs in a running hot folder's inbox (or below it): its watcher moves them away."""
    seen: set[Path] = set()
    for folder in folders:
        for candidate in (folder.resolve(), *folder.resolve().parents):
            if candidate in seen:
                break  # and so are its parents
            seen.add(candidate)
            if holder := lock_holder(candidate):
                if folder.resolve().relative_to(candidate).parts[:1] in (("done",), ("failed",)):
                    break  # the watcher only ever puts files there
                raise StylekitError(f"'{spec}' is in '{candidate}', which a running stylekit watch (pid "
                                    f"{holder}) takes images from; stop it, or batch a copy")


def plan(sources: Sequence[Path], out: Path, preset: str, out_format: str = "same") -> list[Item]:
    """Each source's output: <stem>.<preset><suffix> (see output_suffix), or
    <stem>-<hash of its path>.<preset><suffix> where that name is not this source's alone: two sources
    want it (a.jpg and a.png as PNG), or an earlier run's output there names another input in its
    metadata (a.jpg's PNG, now that a.png's default output is PNG too). A source whose plain-named
    output is already there and names it keeps it: adding a.png to a folder must not make the next
    run style a.jpg again under a new name (see made_from for outputs of older versions). Outputs in
    OUT are no inputs (a glob such as 'shoot/**/*.jpg' reaches them with --out shoot/styled on a
    re-run); any other image there is refused."""
    out_dir = out.resolve()
    kept = []
    for source in sources:
        if source.resolve().parent != out_dir:
            kept.append(source)
        elif not is_output(source):
            raise StylekitError(f"--out '{out}' holds input images ('{source.name}'); "
                                "give the outputs a folder of their own")
    sources = kept
    plain = [out / f"{source.stem}.{preset}{output_suffix(source, out_format)}" for source in sources]
    wanted = Counter(output.name.casefold() for output in plain)
    names = Counter(source.name.casefold() for source in sources)
    items = []
    for source, output in zip(sources, plain, strict=True):
        made = made_from(output, source, names[source.name.casefold()] == 1)
        if made is False or (made is None and wanted[output.name.casefold()] > 1):
            stem = source.stem + "-" + source_id(source)[:8]  # the same however the path was given
            output = out / f"{stem}.{preset}{output.suffix}"
        items.append(Item(source, output))
    return items


def is_output(path: Path) -> bool:
    """Whether an image is stylekit's output (its metadata names stylekit as the software)."""
    try:
        return str(read_metadata(path).get("software", "")).startswith("stylekit")
    except StylekitError:
        return False


def source_id(source: Path) -> str:
    """What an output records to name its input: a hash of its absolute path (the path itself would
    travel with every shared output)."""
    return hashlib.sha256(os.fsencode(source.resolve())).hexdigest()


def made_from(output: Path, source: Path, unique_name: bool = True) -> bool | None:
    """Whether an output was made from this source; None when there is no output with readable
    metadata. Outputs written before content_id existed record only the input's file name: a match
    counts when no other input of this run has that name."""
    if not output.is_file():
        return None
    try:
        metadata = read_metadata(output)
    except StylekitError:
        return None
    if "content_id" in metadata:
        return metadata["content_id"] == source_id(source)
    if "content" in metadata:
        return metadata["content"] == source.name and unique_name
    return None


def make_recipe(preset: Preset, overrides: dict[str, object] | None = None) -> Recipe:
    """Decode the preset's styles and check its options (with overrides) once, before any image."""
    template = preset_request(preset, np.zeros((1, 1, 3), np.float32), overrides)
    validate(template.options)
    return Recipe(preset.name, template, tuple(path.name for path in preset.style_paths))


def failure_reason(error: BaseException) -> str:
    """One line saying why an image failed: a StylekitError's message, else the exception's type too."""
    text = str(error) if isinstance(error, StylekitError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())[:500]


def output_refused(error: BaseException, out: Path) -> OutputRefused | None:
    """A failure to write into the output folder as the refusal that stops the batch, when it is one."""
    cause = disk_refusal(error)
    if cause is None:
        return None
    until = "it is writable" if cause.errno == errno.EROFS else "there is room"
    return OutputRefused(f"the output folder's disk is {DISK_REFUSALS[cause.errno]} ('{out}': "
                         f"{cause.strerror or cause}): run the same command again to resume once {until}")


def _lock(path: Path, wait: bool) -> int | None:
    """Open and flock a lock file: its descriptor, or None when another process holds it (wait=False).
    The kernel drops a lock when its process dies, so a killed run leaves at most a stale file."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        os.close(fd)  # its holder removed it as we locked it: lock the file that is there now


def _unlock(path: Path, fd: int) -> None:
    """Remove a lock file, then let go of it (a waiter then finds its file gone and locks a new one)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(fd)


def _claim_path(item: Item) -> Path:
    """The hidden file whose lock says which process is styling an item (its name cut short, with a
    hash of the whole, so that it fits wherever the output's own name does)."""
    digest = hashlib.sha256(item.output.name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return item.output.with_name(f".{name_start(item.output.name)}.{digest}.lock")


def claim(item: Item) -> None:
    """Make an item this process's to style, until `release`: Skipped when another batch is styling it
    or its output has appeared (made from this input) meanwhile; StylekitError when another input's has."""
    try:
        fd = _lock(_claim_path(item), wait=False)
    except OSError as error:  # a read-only --out refuses even an empty file
        raise output_refused(error, item.output.parent) or StylekitError(
            f"cannot claim it in '{item.output.parent}': {error.strerror or error}") from None
    if fd is None:
        raise Skipped(TAKEN)
    _claims[item.output] = fd
    mine = made_from(item.output, item.source)
    if mine or (mine is None and item.output.exists()):
        raise Skipped("")
    if mine is False:
        raise StylekitError(f"another batch wrote '{item.output.name}' from another input meanwhile; "
                            "the next run styles this one under another name")


def release(item: Item) -> None:
    """Give up this process's claim on an item, if it holds one."""
    fd = _claims.pop(item.output, None)
    if fd is not None:
        _unlock(_claim_path(item), fd)


def load(item: Item, recipe: Recipe) -> tuple[LoadedImage, StyleRequest]:
    """Claim one input and decode it, building its request (StylekitError when the file is not a usable
    image, Skipped when it is not this run's to style or has disappeared); `conclude` releases it."""
    claim(item)
    try:
        picture = load_image(item.source)
    except StylekitError:
        if not os.path.lexists(item.source):
            raise Skipped(GONE) from None
        raise
    return picture, recipe.request(picture.rgb)


def conclude(item: Item, recipe: Recipe, picture: LoadedImage | None, value: Result | BaseException,
             attempts: int, worker: str) -> Outcome:
    """Write a result to the item's output (atomically), or turn a failure into its Outcome; either way
    the item's claim is released."""
    try:
        return _concluded(item, recipe, picture, value, attempts, worker)
    finally:
        release(item)


def _concluded(item: Item, recipe: Recipe, picture: LoadedImage | None, value: Result | BaseException,
               attempts: int, worker: str) -> Outcome:
    """conclude, less the release."""
    if isinstance(value, Skipped):
        return Outcome(item, "skipped", str(value) or None, worker=worker)
    if isinstance(value, Result):
        assert picture is not None
        metadata = {"software": f"stylekit {__version__}", "content": item.source.name,
                    "content_id": source_id(item.source), "preset": recipe.preset,
                    "styles": list(recipe.style_names), **value.report()}
        flattened = picture.alpha is not None and output_format(item.output) == "JPEG"
        try:
            save_image(item.output, value.image, picture.alpha, metadata=metadata,
                       source_metadata=picture.source_metadata, quality=recipe.quality)
        except StylekitError as error:
            value = output_refused(error, item.output.parent) or error
        else:
            height, width = picture.rgb.shape[:2]
            return Outcome(item, "done", attempts=attempts, seconds=value.seconds, worker=worker,
                           warnings=value.warnings + ((JPEG_ALPHA_WARNING,) if flattened else ()),
                           content_size=(width, height), size=(value.width, value.height))
    if isinstance(value, OutputRefused):
        return Outcome(item, "refused", str(value), attempts=attempts, worker=worker)
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


def write_failures(out: Path, ended: Sequence[Item], failures: Sequence[Outcome]) -> None:
    """Replace the failure record's entries for the inputs that ended, and drop those of inputs that
    are gone (atomically, under a lock: other batches may share OUT and keep theirs); once it has no
    entries there is none. Without entries to add or take out it is left alone: a finished batch's OUT
    may be read-only."""
    path = out / FAILED_FILE
    inputs = {os.path.abspath(item.source) for item in ended}

    def outdated(row: dict) -> bool:
        source = os.path.abspath(str(row.get("input")))
        return source in inputs or not os.path.lexists(source)

    if not failures and not any(map(outdated, _failure_rows(path))):
        return
    lock = out / f".{FAILED_FILE}.lock"
    fd = _lock(lock, wait=True)
    assert fd is not None
    try:
        rows = [row for row in _failure_rows(path) if not outdated(row)]
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rows += [{"input": os.path.abspath(o.item.source), "output": str(o.item.output), "reason": o.reason,
                  "attempts": o.attempts, "worker": o.worker, "time": stamp} for o in failures]
        if rows:
            write_json(path, {"failed": rows})
        else:
            path.unlink(missing_ok=True)
    finally:
        _unlock(lock, fd)


def _failure_rows(path: Path) -> list[dict]:
    """The failure record's entries; none when there is no readable record."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("failed")
    except (OSError, ValueError, AttributeError):
        return []
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def run_batch(out: Path, items: Sequence[Item], recipe: Recipe, engine: Engine,
              on_outcome: Callable[[Outcome], None] = lambda outcome: None) -> Summary:
    """Skip items already done, style the rest with the engine, record failures (also when stopped).
    OutputRefused, its message the summary line and how to go on, when the output folder's disk
    refused an output (the batch stops there) or the failure record."""
    started = time.perf_counter()
    summary = Summary()
    todo, ended = [], []
    refused = ""
    try:
        for item in items:
            if item.output.exists():
                summary.skipped += 1
                ended.append(item)
                on_outcome(Outcome(item, "skipped"))
            else:
                todo.append(item)
        for outcome in engine(recipe, todo) if todo else ():
            if outcome.status == "refused":
                refused = outcome.reason or ""
                break
            if outcome.status == "done":
                summary.done += 1
            elif outcome.status == "skipped":
                summary.left += 1
            else:
                summary.failures.append(outcome)
            if outcome.reason != TAKEN:  # another batch's: its failure record is that batch's to keep
                ended.append(outcome.item)
            on_outcome(outcome)
    finally:
        for item in todo:  # claims an engine took but did not conclude (stopped mid-image)
            release(item)
        summary.seconds = time.perf_counter() - started
        try:
            write_failures(out, ended, summary.failures)
        except OSError as error:
            if (record := output_refused(error, out)) is None:
                raise
            refused = refused or str(record)
    if refused:
        to_go = len(items) - summary.done - summary.skipped - summary.left - len(summary.failures)
        what = f"stopped with {to_go} image{'s' * (to_go != 1)} to go" if to_go else \
            "the failure record could not be written"
        raise OutputRefused(f"{summary.line()}; {what}, because {refused}")
    return summary
