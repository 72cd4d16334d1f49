"""Helpers shared by the hot-folder tests: a tiny user preset, drops, polling with deadlines."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from conftest import make_painting, make_photo, save_png
from PIL import Image

from stylekit.pipeline.config import FolderConfig, WatchConfig, checked
from stylekit.pipeline.status import Counts, count
from stylekit.pipeline.stopping import Stopping
from stylekit.pipeline.watcher import watch
from stylekit.presets import user_presets_dir

PRESET = "pipeline-test"


@contextlib.contextmanager
def user_preset() -> Iterator[str]:
    """A user preset with a tiny generated style image, removed afterwards (other tests list presets)."""
    folder = user_presets_dir()
    folder.mkdir(parents=True, exist_ok=True)
    images = folder / PRESET
    images.mkdir(exist_ok=True)
    save_png(images / "style.png", make_painting(32, 32))
    (folder / f"{PRESET}.toml").write_text(
        f'name = "{PRESET}"\ntitle = "Pipeline test"\n[[style]]\nimage = "{PRESET}/style.png"\n'
        '[options]\nsteps = 1\ntargets = "torch"\n', encoding="utf-8")
    try:
        yield PRESET
    finally:
        (folder / f"{PRESET}.toml").unlink()
        shutil.rmtree(images)


def photo_png(seed: int = 0, size: int = 32) -> bytes:
    """A small photo encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray((make_photo(size, size * 3 // 4, seed=seed) * 255).round().astype(np.uint8)).save(
        buffer, format="PNG")
    return buffer.getvalue()


def drop(path: Path, seed: int = 0, size: int = 32) -> bytes:
    """Write a small photo the way a careful client does (temporary name, then rename); its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".part")
    data = photo_png(seed, size)
    temp.write_bytes(data)
    os.rename(temp, path)
    return data


def drop_photos(inbox: Path, count: int, size: int) -> list[str]:
    """Drop photo 0.png … photo N.png (each its own seed) into inbox; their names."""
    names = [f"photo {i}.png" for i in range(count)]
    for i, name in enumerate(names):
        drop(inbox / name, seed=i, size=size)
    return names


def wait_for(check: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    """Poll until check() is truthy (returning it) or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def settled(inbox: Path, finished: int) -> Counts | None:
    """The inbox's counts once nothing is queued or processing and `finished` inputs are done or failed."""
    counts = count(inbox)
    idle = counts.queued == 0 and counts.processing == 0 and counts.done + counts.failed == finished
    return counts if idle else None


def files(folder: Path) -> list[str]:
    """Every file below a folder (hidden ones too), relative and sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def config_for(inbox: Path, outbox: Path, weights: Path, settle: float = 0.2, preset: str | None = PRESET,
               batch: int = 4, **folder: object) -> WatchConfig:
    """A one-folder configuration on the seeded random weights, with a status file (readiness signal)."""
    overrides = {"weights": str(weights), "device": "cpu", **folder.pop("overrides", {})}
    return checked(WatchConfig(
        folders=(FolderConfig(inbox=inbox, out=outbox, preset=preset, overrides=overrides, **folder),),
        settle=settle, batch=batch, status_file=inbox.parent / "status.json"))


@contextlib.contextmanager
def watching(config: WatchConfig) -> Iterator[threading.Event]:
    """Run the watcher in a thread (real observer) until the block ends; re-raise what it raised."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            watch(config, Stopping(stop))
        except BaseException as error:
            errors.append(error)
            stop.set()

    assert config.status_file is not None
    config.status_file.unlink(missing_ok=True)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: config.status_file.exists() or errors, 60, "the watcher to start")
    try:
        yield stop
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive(), "the watcher did not stop"
        if errors:
            raise errors[0]
