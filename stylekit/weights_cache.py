"""The ImageNet weights files on disk, found and checksummed without torch: `stylekit weights status`
answers at once, where importing torch alone takes seconds.

weights.py turns these files (and the other `--weights` choices) into tensors.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

import platformdirs

# torchvision's ImageNet files (tests check that these are torchvision's own); the hex after the dash
# is the start of the file's SHA-256, which a download and a cached copy are checked against.
IMAGENET_URLS = {
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}


def names_a_file(spec: str) -> bool:
    """Whether a --weights value is a file's path, not auto, imagenet, random or random:SEED."""
    return spec not in ("auto", "imagenet", "random") and not spec.startswith("random:")


def cache_dir() -> Path:
    """stylekit's own cache folder (STYLEKIT_CACHE_DIR overrides the platform default)."""
    return Path(os.environ.get("STYLEKIT_CACHE_DIR") or platformdirs.user_cache_dir("stylekit"))


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, TORCH_HOME defaulting to
    $XDG_CACHE_HOME/torch and that to ~/.cache/torch (stylekit never calls torch.hub.set_dir)."""
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub"


def imagenet_file_name(backbone: str) -> str:
    """torchvision's file name, whose hash prefix torch.hub verifies on download."""
    return os.path.basename(IMAGENET_URLS[backbone])


def imagenet_cache_path(backbone: str) -> Path:
    """Where torch's normal hub cache keeps the ImageNet file (TORCH_HOME is honoured)."""
    return torch_hub_dir() / "checkpoints" / imagenet_file_name(backbone)


def imported_path(backbone: str, digest: str) -> Path:
    """Where `stylekit weights import` keeps a user-supplied file that is not torchvision's own: named,
    like torchvision's, with the start of its SHA-256, so a file and its checksum are replaced as one."""
    return cache_dir() / "weights" / f"imported-{backbone}-{digest[:16]}.pth"


def imported_files(backbone: str) -> list[Path]:
    """The backbone's imported files, the last one imported (the one a run uses) first."""
    found = []
    for path in (cache_dir() / "weights").glob(f"imported-{backbone}-*.pth"):
        try:
            found.append((path.stat().st_mtime_ns, path.name, path))
        except OSError:  # replaced by another import just now
            continue
    return [path for *_, path in sorted(found, reverse=True)]


def sha256_of(path: Path) -> str:
    """Stream a file through SHA-256 (weights files are hundreds of MB)."""
    with open(path, "rb") as handle:
        return sha256_of_stream(handle)


def sha256_of_stream(handle: BinaryIO) -> str:
    """SHA-256 of an open file from its start: hashed and then read through one handle, a file that
    an import replaces meanwhile is still the same file."""
    handle.seek(0)
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def cached_file(backbone: str) -> Path | None:
    """The ImageNet file a run would use: torch's cache first, then the last `weights import`."""
    if imagenet_cache_path(backbone).is_file():
        return imagenet_cache_path(backbone)
    return next(iter(imported_files(backbone)), None)


def expected_digest(path: Path) -> str | None:
    """The checksum a cached file must have: the SHA-256 prefix at the end of its name."""
    stem = path.stem.rsplit("-", 1)
    return stem[1] if len(stem) == 2 else None


def _state(backbone: str) -> tuple[str, Path | None]:
    """Whether the file a run would use is cached, corrupt or missing, and which file that is."""
    path = cached_file(backbone)
    if path is None:
        return "missing", None
    try:
        digest = sha256_of(path)
    except FileNotFoundError:  # replaced by a `weights import` just now: look again
        return _state(backbone)
    expected = expected_digest(path)
    return ("corrupt" if expected and not digest.startswith(expected) else "cached"), path


def weights_status() -> list[dict[str, str]]:
    """One row per backbone: where its ImageNet weights are and whether their checksum holds (the
    file a run would use: "cached" for a damaged one would only defer the bad news), or missing."""
    rows = []
    for backbone in IMAGENET_URLS:
        state, path = _state(backbone)
        rows.append({"backbone": backbone, "state": state,
                     "path": str(path or imagenet_cache_path(backbone))})
    return rows
