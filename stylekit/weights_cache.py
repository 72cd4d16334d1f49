"""The ImageNet weights files on disk, found and checksummed without torch: `stylekit weights status`
answers at once, where importing torch alone takes seconds.

weights.py turns these files (and the other `--weights` choices) into tensors.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import platformdirs

# torchvision's ImageNet files (tests check that these are torchvision's own); the hex after the dash
# is the start of the file's SHA-256, which a download and a cached copy are checked against.
IMAGENET_URLS = {
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}


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


def imported_path(backbone: str) -> Path:
    """Where `stylekit weights import` keeps a user-supplied file that is not torchvision's own."""
    return cache_dir() / "weights" / f"imported-{backbone}.pth"


def sha256_of(path: Path) -> str:
    """Stream a file through SHA-256 (weights files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_file(backbone: str) -> Path | None:
    """The ImageNet file a run would use: torch's cache first, then an earlier `weights import`."""
    return next((p for p in (imagenet_cache_path(backbone), imported_path(backbone)) if p.is_file()), None)


def expected_digest(path: Path) -> str | None:
    """The checksum a cached file must have: torchvision's name prefix, or the one saved on import."""
    sidecar = path.with_suffix(".sha256")
    if sidecar.is_file():
        return sidecar.read_text().strip()
    stem = path.stem.rsplit("-", 1)
    return stem[1] if len(stem) == 2 and stem[0] != "imported" else None


def weights_status() -> list[dict[str, str]]:
    """One row per backbone: where its ImageNet weights are and whether their checksum holds (the
    file a run would use: "cached" for a damaged one would only defer the bad news), or missing."""
    rows = []
    for backbone in IMAGENET_URLS:
        path = cached_file(backbone)
        state = "missing"
        if path is not None:
            expected = expected_digest(path)
            state = "corrupt" if expected and not sha256_of(path).startswith(expected) else "cached"
        rows.append({"backbone": backbone, "state": state,
                     "path": str(path or imagenet_cache_path(backbone))})
    return rows
