"""Image files in and out: decode anything Pillow reads to float sRGB, write outputs atomically.

This module knows files and pixels only; tensors and networks live elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from stylekit import icc
from stylekit.atomic import write_bytes
from stylekit.errors import StylekitError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000  # guard against decompression bombs

_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".avif": "AVIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
_FORMAT_HINT = "use .png, .jpg, .webp, .avif or .tif"
LOSSY_FORMATS = frozenset({"JPEG", "WEBP", "AVIF"})  # the formats --quality applies to
# What a folder of images holds, by name: what stylekit writes, plus what it only reads (phones' HEIC).
INPUT_SUFFIXES = (*_FORMATS, ".heic", ".heif", ".hif", ".bmp", ".gif")
_SOFTWARE = "stylekit"
_PNG_META_KEY = "stylekit"
_ASCII_COMMENT = b"ASCII\0\0\0"  # EXIF UserComment's character-code prefix (the JSON is ASCII)
_JPEG_EXIF_LIMIT = 65533  # the most EXIF a JPEG APP1 segment holds
_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_Tag = ExifTags.Base
# What an output keeps of its input's first EXIF directory: who made the picture, with what and when.
# Orientation (the pixels are already upright), the thumbnail (it would show the unstyled photo) and
# the tags describing how and in which colours the input stored its pixels stay behind.
_KEPT_TAGS = frozenset({
    _Tag.DocumentName, _Tag.ImageDescription, _Tag.Make, _Tag.Model, _Tag.PageName, _Tag.DateTime,
    _Tag.Artist, _Tag.HostComputer, _Tag.Copyright, _Tag.Rating, _Tag.RatingPercent, _Tag.XPTitle,
    _Tag.XPComment, _Tag.XPAuthor, _Tag.XPKeywords, _Tag.XPSubject,
})
# Left out of the Exif directory: the maker note (its offsets point into the input file, and it may
# hold a preview) and the interoperability directory (the input's colour space); the size and colour
# space fields are written for the output.
_LEFT_BEHIND = frozenset({_Tag.MakerNote, ExifTags.IFD.Interop})


class ImageError(StylekitError):
    """An image could not be read or written; the message names the file."""


@dataclass(frozen=True)
class SourceMetadata:
    """The input's own metadata that save_image carries to its output: camera EXIF, resolution, depth."""

    exif: bytes = b""  # an EXIF block of the kept tags (_KEPT_TAGS, Exif and GPS directories), or b""
    dpi: tuple[float, float] | None = None  # print resolution, when the input gave one
    bits: int = 8  # 16 for an input with more bits per channel: a PNG or TIFF output keeps 16


@dataclass(frozen=True)
class LoadedImage:
    """Decoded pixels plus the name to use when talking about them."""

    rgb: np.ndarray  # float32, H×W×3, sRGB, values in [0, 1], C-contiguous
    alpha: np.ndarray | None  # float32, H×W in [0, 1], or None when the source had no alpha
    name: str  # file name for messages ("<bytes>" when loaded from bytes)
    source_metadata: SourceMetadata = field(default_factory=SourceMetadata)  # for save_image


def load_image(
    source: str | os.PathLike[str] | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> LoadedImage:
    """Decode a file or upload to float sRGB so callers never see Pillow modes or profiles.

    Fully transparent pixels get their visible neighbours' colours, so what a file keeps under
    alpha 0 cannot change the result; an animation or multi-page file warns that only its first
    frame is used.
    """
    shown = name or ("<bytes>" if isinstance(source, bytes) else Path(source).name)
    label = _quote(name or _source_text(source))
    with _open_image(source, label, max_pixels) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise _too_many_pixels(label, f"{width}×{height} = {width * height:,}", max_pixels)
        deep = _is_deep(im)  # asked before decoding: Pillow's tiles say how many bits a channel has
        orientation = im.getexif().get(_Tag.Orientation, 1)  # a TIFF's is gone once decoded
        im.load()
        profile = im.info.get("icc_profile") or icc.from_nclx(im.info.get("nclx_profile"), label)
        ImageOps.exif_transpose(im, in_place=True)
        bits = 16 if deep or im.mode in _GREY16_MODES or im.mode == "F" else 8
        kept = dataclasses.replace(_source_metadata(im), bits=bits)
        if deep:
            rgb, alpha = _deep_rgb(_deep_channels(source, im.format, orientation), profile)
        else:
            colour, alpha = _split_alpha(im)
            rgb = _rgb_array(colour, profile, label)
        _warn_if_animated(im, label)  # last: counting frames moves through the file
    if alpha is not None:
        rgb = _fill_hidden(rgb, alpha)
    return LoadedImage(rgb=np.ascontiguousarray(rgb, dtype=np.float32), alpha=alpha, name=shown,
                       source_metadata=kept)


def output_format(path: str | os.PathLike[str]) -> str:
    """Pick the Pillow format from the extension so a typo fails before any work is done."""
    suffix = Path(path).suffix.lower()
    if suffix in _FORMATS:
        return _FORMATS[suffix]
    if not suffix:
        raise ImageError(f"output file {_quote(os.fspath(path))} has no extension ({_FORMAT_HINT})")
    raise ImageError(f"unsupported output extension '{suffix}' ({_FORMAT_HINT})")


def output_suffix(source: str | os.PathLike[str], out_format: str) -> str:
    """An output's extension for --format out_format ("png", "jpg", …): that format's, or with "same"
    the input's where stylekit writes that format, else .png (one it reads but does not write: bmp, gif)."""
    suffix = Path(source).suffix if out_format == "same" else f".{out_format}"
    return suffix if suffix.lower() in _FORMATS else ".png"


def save_image(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    *,
    metadata: dict[str, Any] | None = None,
    source_metadata: SourceMetadata | None = None,
    quality: int = 95,
) -> None:
    """Write an image atomically so a failure never leaves a partial or clobbered file.

    It carries the run's metadata (read_metadata reads it back), the input's source_metadata and an
    sRGB profile; JPEG, which has no alpha, gets the transparent parts flattened onto white.
    """
    fmt = output_format(path)
    target = Path(path)
    label = _quote(os.fspath(path))
    if not target.parent.is_dir():
        raise ImageError(f"cannot save {label}: folder {_quote(str(target.parent))} does not exist")
    data = _encode(rgb, alpha, fmt, metadata, source_metadata or SourceMetadata(), quality, label)
    _write_atomically(target, data, label)


def encode_png(
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    *,
    metadata: dict[str, Any] | None = None,
    bits: int = 8,
) -> bytes:
    """Encode a PNG in memory exactly as save_image would, for answering HTTP requests (16 bits per
    channel for an upload that had them)."""
    return _encode(rgb, alpha, "PNG", metadata, SourceMetadata(bits=bits), 95, _quote("<png>"))


def read_metadata(path_or_bytes: str | os.PathLike[str] | bytes) -> dict[str, Any]:
    """Return the settings stored by save_image/encode_png ({} if none) so runs can be traced."""
    with _open_image(path_or_bytes, _quote(_source_text(path_or_bytes))) as im:
        text, earlier = im.info.get(_PNG_META_KEY), {}
        if text is None:
            exif = im.getexif()
            comment = exif.get_ifd(ExifTags.IFD.Exif).get(_Tag.UserComment)
            if isinstance(comment, bytes) and comment.startswith(_ASCII_COMMENT):
                text = comment[len(_ASCII_COMMENT):].decode("ascii", "replace")
            # outputs of earlier versions kept it in the caption, where a camera's own text may be too
            earlier = _json_object(exif.get(_Tag.ImageDescription))
    if str(earlier.get("software", "")).startswith(_SOFTWARE):
        return _json_object(text) or earlier
    return _json_object(text)


def _json_object(text: object) -> dict[str, Any]:
    """A JSON object's value, or {} for anything else (no text, other text, another JSON value)."""
    try:
        value = json.loads(text) if isinstance(text, str) else None
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
    _open_heif()
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


@functools.cache
def _open_heif() -> None:
    """Teach Pillow HEIC/HEIF, the format phones save photos in (decoding only; 40 ms, so on first use)."""
    import pi_heif

    pi_heif.register_heif_opener()


def _warn_if_animated(im: Image.Image, label: str) -> None:
    """Say that only the first frame of an animation (or page of a multi-page TIFF) is used; a
    camera's MPO JPEG is left alone, its other images being previews."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's about damaged later frames
            frames = getattr(im, "n_frames", 1)
    except Exception:  # a damaged later frame (Pillow raises many kinds): only the first is readable
        return
    if frames > 1 and im.format != "MPO":
        kind = "pages" if im.format == "TIFF" else "frames"
        log.warning("image %s has %d %s: only the first is used", label, frames, kind)


def _source_metadata(im: Image.Image) -> SourceMetadata:
    """The EXIF tags and resolution an output keeps of its input; EXIF Pillow cannot re-encode is left
    behind rather than refusing the picture."""
    dpi = im.info.get("dpi")
    if dpi is not None:
        dpi = (float(dpi[0]), float(dpi[1]))
        if not all(0 < value < 1e6 for value in dpi):
            dpi = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's about damaged EXIF
            exif = im.getexif()
            kept = Image.Exif()
            for tag in _KEPT_TAGS.intersection(exif):
                kept[tag] = exif[tag]
            for directory in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo):
                if directory in exif:
                    entries = exif.get_ifd(directory).items()
                    kept[directory] = {tag: value for tag, value in entries if tag not in _LEFT_BEHIND}
            data = kept.tobytes() if len(kept) else b""
    except Exception:  # damaged or odd EXIF (Pillow raises many kinds): the picture matters more
        data = b""
    return SourceMetadata(exif=data, dpi=dpi)


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


def _fill_hidden(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Repaint fully transparent pixels from their visible neighbours (a push-pull pyramid fill), so
    the colour a file keeps under alpha 0 cannot change the result; with nothing visible, grey."""
    hidden = alpha == 0
    if not hidden.any():
        return rgb
    if hidden.all():
        return np.full_like(rgb, 0.5)
    coarse = _push_pull(_block_sums(rgb * alpha[..., None]), _block_sums(alpha))
    return np.where(hidden[..., None], _upsample(coarse, *alpha.shape), rgb)


def _block_sums(values: np.ndarray) -> np.ndarray:
    """Sums of 2×2 blocks (an odd edge padded with zeros): one level down the pyramid."""
    odd = (values.shape[0] % 2, values.shape[1] % 2)
    if any(odd):
        values = np.pad(values, [(0, odd[0]), (0, odd[1])] + [(0, 0)] * (values.ndim - 2))
    return values[0::2, 0::2] + values[1::2, 0::2] + values[0::2, 1::2] + values[1::2, 1::2]


def _push_pull(sums: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Colour everywhere from alpha-weighted colour sums: where a level has little weight, the
    next coarser level's colour, smoothly enlarged, shows through."""
    colour = sums / np.maximum(weight, 1e-12)[..., None]
    if weight.size == 1:  # the top: its weight is the whole image's, never 0 here
        return colour
    coarser = _upsample(_push_pull(_block_sums(sums), _block_sums(weight)), *weight.shape)
    share = np.minimum(weight, 1.0)[..., None]
    return share * colour + (1.0 - share) * coarser


def _upsample(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Enlarge a pyramid level 2× to height×width, interpolating linearly between pixel centres."""
    for axis, size in ((0, height), (1, width)):
        last = values.shape[axis] - 1
        position = np.clip((np.arange(size) + 0.5) / 2 - 0.5, 0, last)
        low = np.floor(position).astype(np.intp)
        shape = [size if i == axis else 1 for i in range(values.ndim)]
        part = (position - low).astype(values.dtype).reshape(shape)
        below, above = np.take(values, low, axis), np.take(values, np.minimum(low + 1, last), axis)
        below *= 1 - part  # in place: at full size these arrays are as large as the picture
        above *= part
        below += above
        values = below
    return values


def _grey_white(im: Image.Image) -> float:
    """White's value in a deep grey image: 1 in float, 2³¹ − 1 in a 32-bit integer TIFF (Pillow's
    signed mode I), else 65535 (16-bit, which Pillow may also open as mode I)."""
    if im.mode == "F":
        return 1.0
    bits = getattr(im, "tag_v2", {}).get(258, 16)  # TIFF BitsPerSample: a number, or one per band
    return 2.0**31 - 1 if im.mode == "I" and max(np.atleast_1d(bits)) == 32 else 65535.0


def _is_deep(im: Image.Image) -> bool:
    """Whether this is a PNG or TIFF with 16-bit colour (or grey with alpha), which Pillow cuts to
    8 bits (or, planar, misreads)."""
    if im.mode not in ("RGB", "RGBA", "LA"):
        return False
    if im.format == "TIFF":  # 16-bit unsigned integers (BitsPerSample, SampleFormat)
        tags = im.tag_v2
        return set(np.atleast_1d(tags.get(258, 8))) == {16} and set(np.atleast_1d(tags.get(339, 1))) == {1}
    return im.format == "PNG" and any(";16" in str(tile.args) for tile in im.tile)  # rawmode RGB;16B, …


def _deep_channels(source: str | os.PathLike[str] | bytes, fmt: str, orientation: int) -> np.ndarray:
    """A 16-bit PNG's or TIFF's channels as upright H×W×C floats in [0, 1], decoded by libpng (through
    torchvision, loaded for the styling anyway) or tifffile, as Pillow keeps only 8 bits of them."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if fmt == "PNG":
        import torch

        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (pyproject pins it)
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_png

            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            pixels = decode_png(encoded, mode=ImageReadMode.UNCHANGED).permute(1, 2, 0).numpy()
    else:
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages[0]
            pixels = page.asarray()
            if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
                pixels = np.moveaxis(pixels, 0, -1)
    pixels = pixels.reshape(*pixels.shape[:2], -1).astype(np.float32) / 65535.0
    method = _TRANSPOSES.get(orientation)
    if method is None:
        return pixels
    planes = [Image.fromarray(np.ascontiguousarray(pixels[..., channel]), "F").transpose(method)
              for channel in range(pixels.shape[2])]
    return np.stack([np.asarray(plane) for plane in planes], axis=-1)


_TRANSPOSES = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,  # by EXIF orientation
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _deep_rgb(channels: np.ndarray, profile: bytes | None) -> tuple[np.ndarray, np.ndarray | None]:
    """sRGB and alpha from 16-bit grey-with-alpha, RGB or RGBA channels, the profile applied."""
    alpha = channels[..., -1] if channels.shape[2] in (2, 4) else None
    if channels.shape[2] == 2:
        grey = icc.grey_to_srgb(channels[..., 0], profile) if profile else channels[..., 0]
        return np.repeat(grey.astype(np.float32)[..., None], 3, axis=2), alpha
    rgb = channels[..., :3]
    if profile:
        rgb = icc.deep_to_srgb(rgb, profile)
    return rgb.astype(np.float32), alpha


def _rgb_array(im: Image.Image, profile: bytes | None, label: str) -> np.ndarray:
    """Turn an alpha-free image of any mode into float sRGB, keeping 16-bit grey precision."""
    if im.mode in _GREY16_MODES or im.mode == "F":
        grey = np.clip(np.asarray(im).astype(np.float64) / _grey_white(im), 0.0, 1.0)
        if profile:
            grey = icc.grey_to_srgb(grey, profile)
        return np.repeat(grey.astype(np.float32)[..., None], 3, axis=2)
    if im.mode not in icc.SPACES:
        try:
            im = im.convert("RGB")
        except ValueError:
            raise ImageError(f"image {label} has unsupported colour mode {im.mode}") from None
    if profile:
        im = icc.to_srgb(im, profile)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im).astype(np.float32) / 255.0


def _quantise(values: np.ndarray, bits: int, label: str) -> np.ndarray:
    """Round and clip [0, 1] floats to 8- or 16-bit integers, refusing NaN/inf that would silently
    become black."""
    if not np.all(np.isfinite(values)):
        raise ImageError(f"cannot save {label}: the image contains NaN or infinite values")
    top = (1 << bits) - 1
    return np.rint(np.clip(values, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)


def _planes(rgb: np.ndarray, alpha: np.ndarray | None, *, flatten: bool) -> np.ndarray:
    """The H×W×3 (or ×4 with alpha) floats to encode, alpha resized to the colour size if needed;
    flatten composites onto white instead (for a format without alpha), as the picture looks on paper."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype.kind != "f":
        raise ValueError(f"rgb must be a float H×W×3 array, got {rgb.dtype} {rgb.shape}")
    if alpha is None:
        return rgb
    alpha = np.asarray(alpha)
    if alpha.ndim != 2 or alpha.dtype.kind != "f":
        raise ValueError(f"alpha must be a float H×W array, got {alpha.dtype} {alpha.shape}")
    height, width = rgb.shape[:2]
    if alpha.shape != (height, width):
        resized = Image.fromarray(alpha.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
        alpha = np.asarray(resized)
    if flatten:
        cover = np.clip(alpha, 0.0, 1.0)[..., None]
        return rgb * cover + (1.0 - cover)
    return np.concatenate([rgb, alpha[..., None].astype(rgb.dtype)], axis=2)


def _deep_png(png: bytes, pixels: np.ndarray) -> bytes:
    """Pillow's 8-bit PNG, with its metadata chunks, carrying 16-bit pixels (H×W×C) instead: IHDR says
    16 bits and one IDAT holds them, each row 'Up'-filtered (the difference to the row above)."""
    rows = pixels.astype(">u2").reshape(pixels.shape[0], -1).view(np.uint8)
    filtered = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG filters are
    pixel_data: bytes | None = zlib.compress(filtered.tobytes(), 6)
    chunks, position = [png[:8]], 8
    while position < len(png):
        length, kind = struct.unpack_from(">I4s", png, position)
        body = png[position + 8:position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            body = body[:8] + b"\x10" + body[9:]
        elif kind == b"IDAT":
            if pixel_data is None:
                continue
            body, pixel_data = pixel_data, None
        chunks.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(chunks)


def _deep_tiff(tiff: bytes, pixels: np.ndarray) -> bytes:
    """Pillow's uncompressed 8-bit TIFF, with its tags (EXIF, profile, resolution), carrying 16-bit
    pixels (H×W×C) instead: its one strip, at the end of the file, replaced, and BitsPerSample and
    StripByteCounts patched."""
    if tiff[:4] != b"II*\0":
        raise ValueError("not a little-endian TIFF")
    directory, = struct.unpack_from("<I", tiff, 4)
    entries = {}
    for index in range(struct.unpack_from("<H", tiff, directory)[0]):
        at = directory + 2 + 12 * index
        tag, kind, count, value = struct.unpack_from("<HHII", tiff, at)
        entries[tag] = (at + 8, kind, count, value)
    (_, _, strips, start), (counts_at, counts_kind, _, size) = entries[273], entries[279]
    bits_at, bits_kind, channels, bits_offset = entries[258]
    if strips != 1 or counts_kind != 4 or bits_kind != 3 or start + size != len(tiff):
        raise ValueError("not laid out as one strip at the end")
    data = bytearray(tiff[:start])
    struct.pack_into("<I", data, counts_at, size * 2)
    struct.pack_into(f"<{channels}H", data, bits_at if channels <= 2 else bits_offset, *[16] * channels)
    return bytes(data) + pixels.astype("<u2").tobytes()


def _output_exif(source: SourceMetadata, size: tuple[int, int], text: str | None) -> Image.Exif:
    """The output's EXIF: the input's kept tags, its resolution, the output's size and colour space,
    Software=stylekit, and the run's metadata (text) as UserComment, which nothing shows as a caption."""
    exif = Image.Exif()
    if source.exif:
        exif.load(source.exif)
    exif[_Tag.Software] = _SOFTWARE
    if source.dpi is not None:
        exif[_Tag.XResolution], exif[_Tag.YResolution] = source.dpi
        exif[_Tag.ResolutionUnit] = 2  # inches
    details = exif.get_ifd(ExifTags.IFD.Exif)
    details.update({_Tag.ColorSpace: 1, _Tag.ExifImageWidth: size[0], _Tag.ExifImageHeight: size[1]})
    if text is not None:
        details[_Tag.UserComment] = _ASCII_COMMENT + text.encode("ascii")
    exif[ExifTags.IFD.Exif] = details
    return exif


def _save_options(
    fmt: str, size: tuple[int, int], metadata: dict[str, Any] | None, source: SourceMetadata, quality: int
) -> dict[str, Any]:
    """Pillow save arguments for a format: the metadata where read_metadata looks (a PNG text chunk,
    else EXIF), the input's metadata (PNG gets EXIF only when the input had some) and sRGB's profile."""
    text = None if metadata is None else json.dumps(metadata)  # ASCII: json.dumps escapes the rest
    options: dict[str, Any] = {"icc_profile": icc.srgb_profile()}
    if source.dpi is not None:
        options["dpi"] = source.dpi
    if fmt == "PNG":
        info = PngInfo()
        info.add_text("Software", _SOFTWARE)
        if text is not None:
            info.add_text(_PNG_META_KEY, text)
        if source.exif:
            options["exif"] = _output_exif(source, size, None).tobytes()
        return {**options, "pnginfo": info}
    exif = _output_exif(source, size, text)
    if fmt == "TIFF":  # uncompressed: libtiff, which compresses, cannot write the Exif directory
        return {**options, "exif": exif}  # (and LZW made styled pictures larger, not smaller)
    data = exif.tobytes()
    if fmt == "JPEG" and len(data) > _JPEG_EXIF_LIMIT:  # too much to carry: only stylekit's own
        data = _output_exif(SourceMetadata(dpi=source.dpi), size, text).tobytes()
    options.update(exif=data, quality=quality)
    if fmt in ("JPEG", "AVIF"):  # 4:4:4: fine coloured brush strokes keep their colour
        options["subsampling"] = 0 if fmt == "JPEG" else "4:4:4"
    return options


def _encode(
    rgb: np.ndarray,
    alpha: np.ndarray | None,
    fmt: str,
    metadata: dict[str, Any] | None,
    source: SourceMetadata,
    quality: int,
    label: str,
) -> bytes:
    """Encode into memory so nothing touches the disk until the bytes are known to be good.

    A PNG or TIFF of a deep input gets 16 bits per channel: Pillow, which writes only 8, encodes the
    metadata, and the pixels are put in its place."""
    planes = _planes(rgb, alpha, flatten=fmt == "JPEG")
    deep = source.bits > 8 and fmt in ("PNG", "TIFF")
    im = Image.fromarray(_quantise(planes, 8, label))
    pixels = _quantise(planes, 16, label) if deep else None
    options = _save_options(fmt, im.size, metadata, source, quality)
    if deep and fmt == "PNG":
        options["compress_level"] = 0  # its pixels are thrown away
    buffer = io.BytesIO()
    try:
        im.save(buffer, format=fmt, **options)
        if pixels is None:
            return buffer.getvalue()
        return (_deep_png if fmt == "PNG" else _deep_tiff)(buffer.getvalue(), pixels)
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise ImageError(f"cannot encode {label} as {fmt}: {e}") from e


def _write_atomically(target: Path, data: bytes, label: str) -> None:
    """Write whole or not at all, with disk errors as one-line ImageErrors."""
    try:
        write_bytes(target, data)
    except OSError as e:
        raise ImageError(f"cannot save {label}: {e.strerror or e}") from e
