"""Where a backbone's weights come from: torchvision's ImageNet files, a user's file, or seeded random.

`--weights auto|imagenet|random|random:SEED|PATH` is resolved here into a plain state dict; the cached
files themselves are found and checksummed in weights_cache.py, without torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .atomic import replacing
from .errors import StylekitError, one_line
from .features import FeatureExtractor, backbone_spec, build_network, network_state_keys
from .request import MAX_SEED
from .weights_cache import (
    IMAGENET_URLS,
    cached_file,
    expected_digest,
    imagenet_cache_path,
    imagenet_file_name,
    imported_files,
    imported_path,
    sha256_of_stream,
)

RANDOM_FLOOR = 0.1  # dead random channels are floored at this share of the layer's median
RANDOM_TARGET_MEAN = 1.0  # Gatys: every channel's mean activation over natural images is 1
DOWNLOAD_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Weights:
    """A resolved weights choice: the tensors plus what to tell the user about where they came from."""

    backbone: str
    state_dict: dict[str, torch.Tensor]
    source: str  # "imagenet", "random" or "file"
    description: str
    sha256: str | None = None
    warning: str | None = None


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and values: a checksum for weights that have no file (random)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _open_weights(path: Path) -> BinaryIO:
    """A user's weights file opened for reading (hashed, checked and loaded through this one handle,
    so a file still being written or replaced cannot be one file for the check and another for the
    rest), with a one-line error for a missing file or a folder."""
    if path.is_dir():
        raise StylekitError(f"weights file '{path}' is a folder")
    if not path.is_file():
        raise StylekitError(f"weights file '{path}' not found")
    return open(path, "rb")


def _load_state_dict(stream: BinaryIO, path: Path) -> dict[str, torch.Tensor]:
    """Load an open .pth file from its start safely (tensors only, no pickled code)."""
    stream.seek(0)
    if not stream.read(4).startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a legacy pickle
        raise StylekitError(f"'{path}' is not a torchvision weights file (not a PyTorch checkpoint)")
    stream.seek(0)
    try:
        data = torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise StylekitError(f"'{path}' is not a torchvision weights file ({one_line(exc, 120)})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise StylekitError(f"'{path}' is not a torchvision weights file (no state dict inside)")
    return data


def _mismatch(data: dict[str, torch.Tensor], backbone: str) -> str | None:
    """Why a state dict is not the backbone's (a missing key, a wrong shape), or None if it is."""
    for key, shape in network_state_keys(backbone).items():
        if key not in data:
            return f"no key '{key}'"
        if data[key].shape != shape:
            return f"'{key}' has shape {tuple(data[key].shape)}, expected {tuple(shape)}"
    return None


def check_state_dict(data: dict[str, torch.Tensor], backbone: str, origin: str) -> dict:
    """Keep the backbone's keys, refusing a file with a missing key, a wrong shape, or a NaN or
    infinite value (a diverged training run's file: every output would be blank, without a word)."""
    problem = _mismatch(data, backbone)
    if problem:
        raise StylekitError(f"'{origin}' is not a {backbone} weights file ({problem})")
    checked = {key: data[key].float() for key in network_state_keys(backbone)}
    for key, value in checked.items():
        if not torch.isfinite(value).all():
            raise StylekitError(f"'{origin}' holds unusable {backbone} weights ('{key}' has NaN or "
                                "infinite values)")
    return checked


def detect_backbone(data: dict[str, torch.Tensor], origin: str) -> str:
    """Tell which backbone a state dict belongs to, by its keys and shapes."""
    for name in IMAGENET_URLS:
        if _mismatch(data, name) is None:
            return name
    raise StylekitError(f"'{origin}' is not a VGG19, VGG16 or ResNet-50 weights file in "
                        "torchvision's format (features.N.weight/bias keys)")


def load_weights_file(path: str | os.PathLike, backbone: str) -> Weights:
    """A user's file, used exactly as given: no rescaling, so the loss stays canonical."""
    path = Path(path)
    with _open_weights(path) as stream:
        digest = sha256_of_stream(stream)
        state = check_state_dict(_load_state_dict(stream, path), backbone, str(path))
    return Weights(backbone, state, "file", f"file {path}", digest)


def download_imagenet(backbone: str, progress: bool = True) -> Path:
    """Fetch torchvision's file into torch's cache, its checksum verified before it is moved there.

    torch.hub's own loader announces "Downloading: …" on stderr even without a progress bar; a quiet
    caller (the server, a benchmark, a pipe) falling back to random weights offline should not.
    """
    url, target = IMAGENET_URLS[backbone], imagenet_cache_path(backbone)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"Downloading {url} to {target}", file=sys.stderr)
        torch.hub.download_url_to_file(url, str(target), hash_prefix=expected_digest(target),
                                       progress=progress)
    except Exception as exc:
        raise StylekitError(
            f"ImageNet {backbone} weights are not cached and could not be downloaded "
            f"({one_line(exc, 120)}); "
            f"copy {imagenet_file_name(backbone)} onto this machine and run `stylekit weights import FILE`, "
            "or use --weights random") from exc
    finally:
        socket.setdefaulttimeout(previous)
    return target


def _cached_imagenet(backbone: str) -> Weights | None:
    """The ImageNet weights from torch's cache or from an earlier `weights import`, if present."""
    path = cached_file(backbone)
    if path is None:
        return None
    try:
        with open(path, "rb") as stream:  # hashed and loaded through one handle: one file both times
            digest, expected = sha256_of_stream(stream), expected_digest(path)
            if expected and not digest.startswith(expected):
                raise StylekitError(f"cached weights '{path}' are corrupt (checksum {digest[:12]} "
                                    f"does not match {expected[:12]}); delete it and try again")
            state = check_state_dict(_load_state_dict(stream, path), backbone, str(path))
    except FileNotFoundError:  # replaced by a `weights import` just now: take the new one
        return _cached_imagenet(backbone)
    return Weights(backbone, state, "imagenet", f"imagenet ({path})", digest)


def import_weights(file: str | os.PathLike) -> tuple[str, Path]:
    """Check a torchvision-format file and copy it into the cache so `imagenet` finds it offline; the
    files of earlier imports are deleted (of two imports at once, the one that finished last wins)."""
    source = Path(file)
    with _open_weights(source) as stream:
        digest, size = sha256_of_stream(stream), stream.tell()
        state = _load_state_dict(stream, source)
        backbone = detect_backbone(state, str(source))
        check_state_dict(state, backbone, str(source))
        official = digest.startswith(expected_digest(imagenet_cache_path(backbone)) or "")
        target = imagenet_cache_path(backbone) if official else imported_path(backbone, digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        with replacing(target) as temp, open(temp, "wb") as copy:
            stream.seek(0)
            shutil.copyfileobj(stream, copy)
            copy.truncate(size)  # the bytes hashed and checked, not what was written after them
    for older in [] if official else imported_files(backbone)[1:]:
        with contextlib.suppress(OSError):  # gone already, or open on Windows: deleted next time
            older.unlink()
    return backbone, target


def calibration_images(count: int = 8, size: int = 96, seed: int = 0) -> torch.Tensor:
    """Synthetic natural-looking images (smooth colour fields, edges, texture) to calibrate on."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(count):
        image = torch.zeros(3, size, size)
        for _ in range(4):  # low-frequency colour waves
            freq, phase = torch.rand(2, generator=gen) * torch.tensor([8.0, 6.28])
            angle = torch.rand(1, generator=gen) * 3.1416
            wave = torch.sin(freq * (xs * torch.cos(angle) + ys * torch.sin(angle)) * 6.28 + phase)
            image += torch.rand(3, 1, 1, generator=gen) * wave
        for _ in range(6):  # flat rectangles give hard edges
            x0, y0 = (torch.rand(2, generator=gen) * size * 0.8).long().tolist()
            w, h = (torch.rand(2, generator=gen) * size * 0.4 + 4).long().tolist()
            image[:, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=gen) * 2 - 1
        image += 0.15 * torch.randn(3, size, size, generator=gen)  # fine texture
        image = (image - image.amin()) / (image.amax() - image.amin())
        images.append(image)
    return torch.stack(images)


def random_state_dict(backbone: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded untrained network in torchvision's format, rescaled to be usable for style transfer.

    Convolutions get Kaiming (fan-in) normal weights and zero biases, the variant measured most robust
    here. For VGG, each ReLU channel is then rescaled to mean activation RANDOM_TARGET_MEAN over
    calibration images (Gatys' normalisation), with near-dead channels floored at RANDOM_FLOOR × the
    layer median so they cannot dominate the Gram loss; the inverse scale is folded into the next
    convolution's inputs, so deeper layers compute the same function up to their own scale.
    """
    gen = torch.Generator().manual_seed(seed)
    network = build_network(backbone)
    state = network.state_dict()
    for key, tensor in state.items():
        if key.endswith("weight") and tensor.dim() == 4:
            fan_in = tensor[0].numel()
            state[key] = torch.randn(tensor.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith("bias") and key.startswith("features."):
            state[key] = torch.zeros_like(tensor)
    if backbone.startswith("vgg"):
        _normalise_vgg(backbone, state)
    return state


def _normalise_vgg(backbone: str, state: dict[str, torch.Tensor]) -> None:
    """Rescale every VGG ReLU channel to the target mean activation (in place, function-preserving)."""
    relus = [name for name in backbone_spec(backbone).layers if name.startswith("relu")]
    extractor = FeatureExtractor(backbone, state, relus)
    with torch.no_grad():
        features = extractor(calibration_images())
    conv_keys = [key[:-len(".weight")] for key, t in state.items()
                 if key.endswith(".weight") and t.dim() == 4]
    previous = None
    for relu, conv in zip(relus, conv_keys, strict=True):
        means = features[relu].mean(dim=(0, 2, 3)).double()
        scale = RANDOM_TARGET_MEAN / means.clamp_min(RANDOM_FLOOR * means.median())
        weight = state[f"{conv}.weight"].double() * scale.view(-1, 1, 1, 1)
        if previous is not None:
            weight /= previous.view(1, -1, 1, 1)
        state[f"{conv}.weight"] = weight.float()
        state[f"{conv}.bias"] = (state[f"{conv}.bias"].double() * scale).float()
        previous = scale


def resolve_weights(spec: str, backbone: str = "vgg19", *, progress: bool = True) -> Weights:
    """Turn a `--weights` value into tensors, downloading only when `imagenet` or `auto` allows it."""
    backbone_spec(backbone)
    if spec == "random" or spec.startswith("random:"):
        seed_text = spec.partition(":")[2] or "0"
        if not seed_text.isdigit() or int(seed_text) > MAX_SEED:
            raise StylekitError(f"bad --weights '{spec}' (random:SEED needs a whole number "
                                f"from 0 to {MAX_SEED})")
        seed = int(seed_text)
        state = random_state_dict(backbone, seed)
        return Weights(backbone, state, "random", f"random (seed {seed})", state_dict_sha256(state))
    if spec in ("imagenet", "auto"):
        cached = _cached_imagenet(backbone)
        if cached:
            return cached
        try:
            download_imagenet(backbone, progress=progress)
        except StylekitError as exc:
            if spec == "imagenet":
                raise
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fallback = resolve_weights("random", backbone)
            note = (f"ImageNet weights unavailable ({one_line(exc.__cause__ or exc, 120)}); "
                    "using seeded random weights: results are mostly colour and fine texture. "
                    "Run `stylekit weights download` or `stylekit weights import FILE`.")
            return Weights(backbone, fallback.state_dict, "random", fallback.description,
                           fallback.sha256, warning=note)
        cached = _cached_imagenet(backbone)
        assert cached is not None
        return cached
    return load_weights_file(spec, backbone)
