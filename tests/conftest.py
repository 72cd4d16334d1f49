"""Shared fixtures: isolated caches and config, seeded random weights in torchvision's format, tiny images."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylekit.weights import random_state_dict

WEIGHTS_SEED = 1234


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep every test away from the user's caches, config and network (set before any use)."""
    root = tmp_path_factory.mktemp("env")
    os.environ["STYLEKIT_CACHE_DIR"] = str(root / "cache")
    os.environ["TORCH_HOME"] = str(root / "torch")
    os.environ["XDG_CONFIG_HOME"] = str(root / "config")
    os.environ["XDG_CACHE_HOME"] = str(root / "xdg-cache")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return root


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random VGG19 saved exactly as torchvision saves its ImageNet file (with classifier)."""
    state = random_state_dict("vgg19", seed=WEIGHTS_SEED)
    generator = torch.Generator().manual_seed(WEIGHTS_SEED)
    for name, shape in (("classifier.0", (4096, 25088)), ("classifier.3", (4096, 4096)),
                        ("classifier.6", (1000, 4096))):
        state[f"{name}.weight"] = torch.randn(shape, generator=generator) * 0.01
        state[f"{name}.bias"] = torch.zeros(shape[0])
    path = tmp_path_factory.mktemp("weights") / "vgg19-random.pth"
    torch.save(state, path)
    return path


def make_photo(width: int = 48, height: int = 40, seed: int = 0) -> np.ndarray:
    """A small smooth 'photo': gradients and a few shapes, float32 H×W×3 in [0, 1]."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([xs / width, ys / height, 0.5 + 0.4 * np.sin(xs / 5 + ys / 7)], axis=-1)
    for _ in range(3):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        image[y0:y0 + height // 3, x0:x0 + width // 3] = rng.random(3)
    return image.astype(np.float32)


def make_painting(width: int = 40, height: int = 40, seed: int = 1) -> np.ndarray:
    """A small high-contrast 'painting': coloured stripes and noise, float32 H×W×3 in [0, 1]."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    stripes = (np.sin((xs + ys) / 2.5) > 0).astype(np.float32)
    image = np.stack([stripes, 1 - stripes, 0.3 + 0.2 * stripes], axis=-1)
    return np.clip(image + 0.2 * rng.standard_normal(image.shape), 0, 1).astype(np.float32)


def save_png(path: Path, image: np.ndarray) -> Path:
    """Write a float image as an 8-bit PNG for CLI tests."""
    Image.fromarray((image * 255).round().astype(np.uint8)).save(path)
    return path


@pytest.fixture
def photo_path(tmp_path: Path) -> Path:
    """A 48×40 content image on disk."""
    return save_png(tmp_path / "photo.png", make_photo())


@pytest.fixture
def painting_path(tmp_path: Path) -> Path:
    """A 40×40 style image on disk."""
    return save_png(tmp_path / "painting.png", make_painting())


def start_server(log: Path, *args: str, timeout: float = 180.0,
                 environment: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start a real `stylekit serve` (port 0: a free one) and wait for its URL; stderr goes to log.

    `environment` adds variables to the server's (this process's own, isolated by the fixture above).
    """
    command = [str(Path(sys.executable).parent / "stylekit"), "serve", "--port", "0", *args]
    with open(log, "w") as stream:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stream,
                                   env={**os.environ, **(environment or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://\S+)", log.read_text())
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            raise RuntimeError(f"stylekit serve exited {process.returncode}: {log.read_text()}")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"stylekit serve did not start in {timeout} s: {log.read_text()}")


@pytest.fixture(scope="session")
def live_server(weights_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server on 127.0.0.1 with the seeded random weights on the CPU; yields its URL."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    process, url = start_server(log, "--weights", str(weights_file), "--device", "cpu")
    yield url
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a shared 2-core machine tiny images run several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipeline_preset():
    """The hot-folder tests' user preset (a tiny generated style image), removed afterwards."""
    from pipeline_support import user_preset

    with user_preset() as name:
        yield name


@pytest.fixture
def boxes(tmp_path: Path) -> tuple[Path, Path]:
    """An empty inbox and outbox."""
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    return inbox, outbox


@contextlib.contextmanager
def small_disk(folder: Path) -> Iterator[Path]:
    """A real 256 KiB disk of its own mounted on folder (a tmpfs, so root only): pytest skips where it
    cannot mount."""
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    if not mounted:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill(disk: Path) -> Path:
    """Fill a small disk to the last byte; the file that fills it (remove it to make room)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    return filler


def make_read_only(disk: Path) -> None:
    """Remount a small disk read-only, as a write-protected card or an NFS export mounted ro is."""
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
