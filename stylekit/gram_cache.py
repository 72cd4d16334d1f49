"""Style Grams kept on disk, so applying a preset again skips the style forward pass.

Entries are keyed by the exact input pixels (which carry the style image, its scale and the output
size), the layers asked for, and a context string naming the weights checksum, backbone, pooling,
target engine and forward precision; any change among those is a different file, so stale entries
are never read. Every output size makes its own entry (~2.4 MB for VGG19's five style layers), so
the folder is kept under a size limit by dropping the least recently used entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import disk_cache
from .atomic import replacing
from .errors import one_line
from .weights_cache import cache_dir

if TYPE_CHECKING:
    from .engine import TargetFn

log = logging.getLogger(__name__)


def grams_dir() -> Path:
    """Where cached Grams live: next to the ONNX exports in stylekit's cache."""
    return cache_dir() / "grams"


DEFAULT_LIMIT_MB = 1024.0


def limit_bytes() -> int:
    """The cache's size limit: $STYLEKIT_GRAM_CACHE_MB (0 keeps nothing), else DEFAULT_LIMIT_MB."""
    return disk_cache.limit_bytes("STYLEKIT_GRAM_CACHE_MB", DEFAULT_LIMIT_MB)


def _digest(image: torch.Tensor, feature_layers: tuple[str, ...], gram_layers: tuple[str, ...],
            context: str) -> str:
    """SHA-256 over the pixels and everything else that decides the targets."""
    pixels = image.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(f"{context}|{tuple(pixels.shape)}|{feature_layers}|{gram_layers}|".encode())
    digest.update(pixels.numpy().tobytes())
    return digest.hexdigest()[:32]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over an entry's names, shapes, types and values: torch.load checks none of them, so a
    file damaged on disk would otherwise give wrong targets without a word."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _read(path: Path, names: set[str]) -> dict[str, torch.Tensor] | None:
    """A cached entry, or None when absent (perhaps pruned by another process just now), unreadable,
    damaged or not holding the expected tensors."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, NotADirectoryError):  # absent, or the cache folder is not one (_write says so)
        return None
    except Exception as exc:  # torch.load raises many unrelated types for a damaged file
        log.warning("ignoring unreadable Gram cache file %s (%s)", path, type(exc).__name__)
        return None
    tensors = data.get("tensors") if isinstance(data, dict) else None
    if not isinstance(tensors, dict) or set(tensors) != names:
        return None
    if data.get("sha256") != _checksum(tensors):
        log.warning("ignoring damaged Gram cache file %s (its checksum does not match)", path)
        return None
    return tensors


def _write(path: Path, targets: dict[str, torch.Tensor]) -> None:
    """Save atomically (temp file, then rename); a cache that cannot be written only costs speed.

    The file is opened here, not by torch.save, whose errors carry C++ source locations.
    """
    tensors = {name: value.detach().cpu() for name, value in targets.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as temp, open(temp, "wb") as stream:
            torch.save({"tensors": tensors, "sha256": _checksum(tensors)}, stream)
    except OSError as exc:
        log.warning("cannot write Gram cache file %s (%s)", path, exc.strerror or one_line(exc))
    except RuntimeError:  # how torch.save reports a write cut short
        log.warning("cannot write Gram cache file %s (the write was cut short: is the disk full?)", path)


def cached_targets(compute: TargetFn, context: str, label: str) -> TargetFn:
    """Wrap a TargetFn so each distinct input is computed once, then read back from disk.

    `label` (e.g. a preset name) only prefixes file names, so a folder listing stays readable.
    """
    prefix = re.sub(r"[^a-z0-9-]+", "-", label.lower()).strip("-")[:40] or "style"

    def compute_cached(image: torch.Tensor, feature_layers: tuple[str, ...],
                       gram_layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        path = grams_dir() / f"{prefix}-{_digest(image, feature_layers, gram_layers, context)}.pt"
        names = {*feature_layers, *(f"gram_{name}" for name in gram_layers)}
        cached = _read(path, names)
        if cached is not None:
            log.debug("Gram cache hit %s", path)
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: the last to be pruned
            return {name: value.to(image.device) for name, value in cached.items()}
        log.debug("Gram cache miss %s", path)
        targets = compute(image, feature_layers, gram_layers)
        _write(path, targets)
        disk_cache.prune(path.parent, "*.pt", limit_bytes())
        return targets

    return compute_cached
