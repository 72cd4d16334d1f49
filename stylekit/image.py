"""Image files in and out: decode anything Pillow reads to float sRGB, write outputs atomically.

This module knows files and pixels only; tensors and networks live elsewhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from stylekit.atomic import write_bytes
from stylekit.errors import StylekitError

DEFAULT_MAX_PIXELS = 50_000_000  # guard against decompression bombs

_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
_FORMAT_HINT = "use .png, .jpg, .webp or .tif"
_SOFTWARE = "stylekit"
_PNG_META_KEY = "stylekit"
_EXIF_DESCRIPTION = 0x010E
_EXIF_SOFTWARE = 0x0131
_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ICC_SPACES = {"RGB": "RGB ", "L": "GRAY", "CMYK": "CMYK"}


class ImageError(StylekitError):
    """An image could not be read or written; the message names the file."""


@dataclass(frozen=True)
class LoadedImage:
    """Decoded pixels plus the name to use when talking about them."""

    rgb: np.ndarray  # float32, H×W×3, sRGB, values in [0, 1], C-contiguous
    alpha: np.ndarray | None  # float32, H×W in [0, 1], or None when the source had no alpha
    name: str  # file name for messages ("<bytes>" when loaded from bytes)


def load_image(
    source: str | os.PathLike[str] | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> LoadedImage:
    """Decode a file or upload to float sRGB so callers never see Pillow modes or profiles."""
    shown = name or ("<bytes>" if isinstance(source, bytes) else Path(source).name)
    label = _quote(name or _source_text(source))
    with _open_image(source, label, max_pixels) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise _too_many_pixels(label, f"{width}×{height} = {width * height:,}", max_pixels)
        im.load()
        icc = im.info.get("icc_profile")
        ImageOps.exif_transpose(im, in_place=True)
        colour, alpha = _split_alpha(im)
        rgb = _rgb_array(colour, icc, label)
    return LoadedImage(rgb=np.ascontiguousarray(rgb, dtype=np.float32), alpha=alpha, name=shown)


def output_format(path: str | os.PathLike[str]) -> str:
    """Pick the Pillow format from the extension so a typo fails before any work is done."""
    suffix = Path(path).suffix.lower()
    if suffix in _FORMATS:
        return _FORMATS[suffix]
    if not suffix:
        raise ImageError(f"output file {_quote(os.fspath(path))} has no extension ({_FORMAT_HINT})")
    raise ImageError(f"unsupported output extension '{suffix}' ({_FORMAT_HINT})")


def save_image(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    *,
    metadata: dict[str, Any] | None = None,
    quality: int = 95,
) -> None:
    """Write an image atomically so a failure never leaves a partial or clobbered file."""
    fmt = output_format(path)
    target = Path(path)
    label = _quote(os.fspath(path))
    if not target.parent.is_dir():
        raise ImageError(f"cannot save {label}: folder {_quote(str(target.parent))} does not exist")
    data = _encode(rgb, alpha if fmt != "JPEG" else None, fmt, metadata, quality, label)
    _write_atomically(target, data, label)


def encode_png(
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    *,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """Encode a PNG in memory exactly as save_image would, for answering HTTP requests."""
    return _encode(rgb, alpha, "PNG", metadata, 95, _quote("<png>"))


def read_metadata(path_or_bytes: str | os.PathLike[str] | bytes) -> dict[str, Any]:
    """Return the settings stored by save_image/encode_png ({} if none) so runs can be traced."""
    with _open_image(path_or_bytes, _quote(_source_text(path_or_bytes))) as im:
        text = im.info.get(_PNG_META_KEY)
        if text is None:
            text = im.getexif().get(_EXIF_DESCRIPTION)
    if not isinstance(text, str):
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _source_text(source: str | os.PathLike[str] | bytes) -> str:
    """Name a source for messages: the path as given, or "<bytes>" for in-memory data."""
    return "<bytes>" if isinstance(source, bytes) else os.fspath(source)


def _quote(text: str) -> str:
    """Quote a file name for a one-line message, replacing control characters."""
    return "'" + "".join(c if c.isprintable() else "?" for c in text) + "'"


@contextlib.contextmanager
def _open_stream(source: str | os.PathLike[str] | bytes, label: str) -> Iterator[BinaryIO]:
    """Open the raw bytes of a source, turning missing/folder/empty/unreadable into ImageError."""
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"image {label} is empty (0 bytes)")
        yield io.BytesIO(source)
        return
    path = Path(source)
    try:
        stream = path.open("rb")
    except FileNotFoundError:
        raise ImageError(f"image {label} not found") from None
    except OSError as e:
        if path.is_dir():
            raise ImageError(f"image {label} is a folder, not a file") from None
        raise ImageError(f"cannot read image {label}: {e.strerror or e}") from e
    with stream:
        if os.fstat(stream.fileno()).st_size == 0:
            raise ImageError(f"image {label} is empty (0 bytes)")
        yield stream


def _too_many_pixels(label: str, pixels: str, limit: int) -> ImageError:
    """One message for an image over the pixel limit, whichever check refused it."""
    return ImageError(f"image {label} is {pixels} pixels, over the limit of {limit:,}")


def _bomb_pixels(error: Image.DecompressionBombError) -> str:
    """The pixel count Pillow's hard guard refused an image for: its message says it (the least it
    can be, should Pillow's wording change)."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(found[1]):,}" if found else f"over {2 * Image.MAX_IMAGE_PIXELS:,}"


@contextlib.contextmanager
def _open_image(
    source: str | os.PathLike[str] | bytes, label: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[Image.Image]:
    """Open a source with Pillow, turning every decoding failure in the block into ImageError.

    load_image checks the pixel count against max_pixels before decoding, so Pillow's warning for
    images over its own process-wide limit is ignored; its hard guard (twice that limit) refuses an
    image before the size is known, and gets the same message.
    """
    with _open_stream(source, label) as stream:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(stream) as im:
                    yield im
        except UnidentifiedImageError:
            raise ImageError(f"{label} is not an image stylekit can read") from None
        except Image.DecompressionBombError as e:
            limit = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)
            raise _too_many_pixels(label, _bomb_pixels(e), limit) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"image {label} is truncated or corrupt ({e})") from e


def _split_alpha(im: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """Split transparency (alpha band or transparent colour) from colour so each converts alone."""
    if "transparency" in im.info and im.mode in _GREY16_MODES:
        alpha = np.asarray(im) != im.info["transparency"]
        return im, alpha.astype(np.float32)
    if "transparency" in im.info:
        im = im.convert("LA" if im.mode in ("1", "L") else "RGBA")
    elif im.mode in ("La", "RGBa", "PA"):
        im = im.convert("LA" if im.mode == "La" else "RGBA")
    if im.mode not in ("LA", "RGBA"):
        return im, None
    alpha = np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
    return im.convert(im.mode[:-1]), alpha


def _grey_white(im: Image.Image) -> float:
    """White's value in a deep grey image: 1 in float, 2³¹ − 1 in a 32-bit integer TIFF (Pillow's
    signed mode I), else 65535 (16-bit, which Pillow may also open as mode I)."""
    if im.mode == "F":
        return 1.0
    bits = getattr(im, "tag_v2", {}).get(258, 16)  # TIFF BitsPerSample: a number, or one per band
    return 2.0**31 - 1 if im.mode == "I" and max(np.atleast_1d(bits)) == 32 else 65535.0


def _rgb_array(im: Image.Image, icc: bytes | None, label: str) -> np.ndarray:
    """Turn an alpha-free image of any mode into float sRGB, keeping 16-bit grey precision."""
    if im.mode in _GREY16_MODES or im.mode == "F":
        grey = np.clip(np.asarray(im).astype(np.float64) / _grey_white(im), 0.0, 1.0).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode not in _ICC_SPACES:
        try:
            im = im.convert("RGB")
        except ValueError:
            raise ImageError(f"image {label} has unsupported colour mode {im.mode}") from None
    if icc:
        im = _icc_to_srgb(im, icc)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im).astype(np.float32) / 255.0


def _icc_to_srgb(im: Image.Image, icc: bytes) -> Image.Image:
    """Apply an embedded RGB/grey/CMYK profile; a broken or mismatched one changes nothing."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space != _ICC_SPACES[im.mode]:
            return im
        return ImageCms.profileToProfile(
            im, profile, ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    except (ImageCms.PyCMSError, OSError, ValueError):
        return im


def _to_uint8(values: np.ndarray, label: str) -> np.ndarray:
    """Round and clip [0, 1] floats to bytes, refusing NaN/inf that would silently become black."""
    if not np.all(np.isfinite(values)):
        raise ImageError(f"cannot save {label}: the image contains NaN or infinite values")
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_pil(rgb: np.ndarray, alpha: np.ndarray | None, label: str) -> Image.Image:
    """Build an 8-bit RGB(A) Pillow image, resizing alpha to the colour size if needed."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype.kind != "f":
        raise ValueError(f"rgb must be a float H×W×3 array, got {rgb.dtype} {rgb.shape}")
    planes = [_to_uint8(rgb, label)]
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.ndim != 2 or alpha.dtype.kind != "f":
            raise ValueError(f"alpha must be a float H×W array, got {alpha.dtype} {alpha.shape}")
        height, width = rgb.shape[:2]
        if alpha.shape != (height, width):
            resized = Image.fromarray(alpha.astype(np.float32)).resize(
                (width, height), Image.Resampling.BILINEAR
            )
            alpha = np.asarray(resized)
        planes.append(_to_uint8(alpha, label)[..., None])
    return Image.fromarray(np.concatenate(planes, axis=2))


def _save_options(fmt: str, metadata: dict[str, Any] | None, quality: int) -> dict[str, Any]:
    """Pillow save arguments for a format, carrying the metadata where read_metadata looks."""
    text = None if metadata is None else json.dumps(metadata)
    if fmt == "PNG":
        info = PngInfo()
        info.add_text("Software", _SOFTWARE)
        if text is not None:
            info.add_text(_PNG_META_KEY, text)
        return {"pnginfo": info}
    exif = Image.Exif()
    exif[_EXIF_SOFTWARE] = _SOFTWARE
    if text is not None:
        exif[_EXIF_DESCRIPTION] = text
    if fmt == "TIFF":
        return {"exif": exif, "compression": "tiff_lzw"}
    return {"exif": exif.tobytes(), "quality": quality}


def _encode(
    rgb: np.ndarray,
    alpha: np.ndarray | None,
    fmt: str,
    metadata: dict[str, Any] | None,
    quality: int,
    label: str,
) -> bytes:
    """Encode into memory so nothing touches the disk until the bytes are known to be good."""
    im = _to_pil(rgb, alpha, label)
    options = _save_options(fmt, metadata, quality)
    buffer = io.BytesIO()
    try:
        im.save(buffer, format=fmt, **options)
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot encode {label} as {fmt}: {e}") from e
    return buffer.getvalue()


def _write_atomically(target: Path, data: bytes, label: str) -> None:
    """Write whole or not at all, with disk errors as one-line ImageErrors."""
    try:
        write_bytes(target, data)
    except OSError as e:
        raise ImageError(f"cannot save {label}: {e.strerror or e}") from e
