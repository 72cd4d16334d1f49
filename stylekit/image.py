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
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from stylekit import icc
from stylekit.atomic import write_bytes
from stylekit.errors import StylekitError, one_line, printable

log = logging.getLogger(__name__)
logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # logs each damaged tag it skips, as errors

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
_HEIF_SUFFIXES = (".heic", ".heif", ".hif")
INPUT_SUFFIXES = (*_FORMATS, *_HEIF_SUFFIXES, ".bmp", ".gif")
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


class IncompleteImage(ImageError):
    """An image that is empty, cut short or not recognisable: what a file still being written looks
    like too, so a hot folder gives it time before it calls it broken."""


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
    warnings: tuple[str, ...] = ()  # what loading it logged, for callers that report per image


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
    with _logged_here() as said:
        try:
            read = _tifffile_image(source, label, max_pixels) or _pillow_image(source, label, max_pixels)
        except (StylekitError, OSError, MemoryError):
            raise
        except Exception as e:  # a decoder's own on a damaged file: tifffile, Pillow's EXIF… raise many kinds
            raise _corrupt(label, e) from e
    rgb, alpha, kept = read
    if alpha is not None:
        _fill_hidden(rgb, alpha)
    return LoadedImage(rgb=np.ascontiguousarray(rgb, dtype=np.float32), alpha=alpha, name=shown,
                       source_metadata=kept, warnings=tuple(said))


class _ThreadsWarnings(logging.Filter):
    """Notes the messages of the warnings one thread logs, and lets every record through (a filter,
    not a handler: a handler would keep logging's last resort from printing them where nothing else is
    set up)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())
        return True


@contextlib.contextmanager
def _logged_here() -> Iterator[list[str]]:
    """The warnings this thread logs from this module while the block runs (they are logged as well):
    a server loads several uploads at once, and each job reports only its own."""
    noted = _ThreadsWarnings()
    log.addFilter(noted)
    try:
        yield noted.messages
    finally:
        log.removeFilter(noted)


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
    the input's where stylekit writes that format, else the nearest it writes: .jpg for a phone's HEIC
    (a photo, where a PNG would be five times the size), .png for the rest (bmp, gif)."""
    suffix = Path(source).suffix if out_format == "same" else f".{out_format}"
    if suffix.lower() in _FORMATS:
        return suffix
    return ".jpg" if suffix.lower() in _HEIF_SUFFIXES else ".png"


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
    return f"'{printable(text)}'"


@contextlib.contextmanager
def _open_stream(source: str | os.PathLike[str] | bytes, label: str) -> Iterator[BinaryIO]:
    """Open the raw bytes of a source, turning missing/folder/empty/unreadable into ImageError."""
    if isinstance(source, bytes):
        if not source:
            raise IncompleteImage(f"image {label} is empty (0 bytes)")
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
            raise IncompleteImage(f"image {label} is empty (0 bytes)")
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
                warnings.simplefilter("ignore", UserWarning)  # damaged metadata: said as an error, if at all
                with Image.open(stream) as im:
                    yield im
        except UnidentifiedImageError:
            stream.seek(0)
            if _is_heif(stream.read(12)):  # Pillow opens a HEIF's structure: here it is cut short or broken
                raise IncompleteImage(f"image {label} is truncated or corrupt") from None
            raise IncompleteImage(f"{label} is not an image stylekit can read") from None
        except Image.DecompressionBombError as e:
            limit = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)
            raise _too_many_pixels(label, _bomb_pixels(e), limit) from None
        except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
            raise _corrupt(label, e) from e


def _corrupt(label: str, error: Exception) -> ImageError:
    """One message for a file whose decoding failed, whichever decoder said so."""
    return IncompleteImage(f"image {label} is truncated or corrupt ({one_line(error)})")


def _is_heif(head: bytes) -> bool:
    """Whether a file's first bytes are a HEIC's, HEIF's or AVIF's (an ISO 'ftyp' box naming its brand)."""
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif",
                          b"avis"})


@functools.cache
def _open_heif() -> None:
    """Teach Pillow HEIC/HEIF, the format phones save photos in (decoding only; 40 ms, so on first use)."""
    import pi_heif

    pi_heif.register_heif_opener()


def _warn_if_animated(im: Image.Image, label: str) -> None:
    """Say that only the first frame of an animation (page of a multi-page TIFF, or a HEIF's primary
    image) is used; a camera's MPO JPEG is left alone, its other images being previews."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's about damaged later frames
            frames = getattr(im, "n_frames", 1)
    except Exception:  # a damaged later frame (Pillow raises many kinds): only the first is readable
        return
    if im.format != "MPO":
        _warn_of_frames(frames, im.format, label)


def _warn_of_frames(frames: int, fmt: str | None, label: str) -> None:
    """Say, where a file of a format holds several frames (pages, images), which one alone is used."""
    if frames > 1:
        kind, used = _PARTS.get(fmt, ("frames", "the first"))
        log.warning("image %s has %d %s: only %s is used", label, frames, kind, used)


# A file's several pictures, by format: what they are called and which one is used (else frames, the first)
_PARTS = {"TIFF": ("pages", "the first"), "HEIF": ("images", "its primary one")}


def _source_metadata(read_exif: Callable[[], Image.Exif], dpi: Any) -> SourceMetadata:
    """The EXIF tags (read_exif's) and resolution (dpi: two numbers, or None) an output keeps of its
    input; EXIF Pillow cannot read or re-encode is left behind rather than refusing the picture."""
    if dpi is not None:
        dpi = (float(dpi[0]), float(dpi[1]))
        if not all(0 < value < 1e6 for value in dpi):
            dpi = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's about damaged EXIF
            exif = read_exif()
            kept = Image.Exif()
            for tag in _KEPT_TAGS.intersection(exif):
                kept[tag] = exif[tag]
            if _is_writer_note(kept.get(_Tag.ImageDescription)):
                del kept[_Tag.ImageDescription]
            for directory in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo):
                if directory in exif:
                    entries = exif.get_ifd(directory).items()
                    kept[directory] = {tag: value for tag, value in entries if tag not in _LEFT_BEHIND}
            data = kept.tobytes() if len(kept) else b""
    except Exception:  # damaged or odd EXIF (Pillow raises many kinds): the picture matters more
        data = b""
    return SourceMetadata(exif=data, dpi=dpi)


def _is_writer_note(description: object) -> bool:
    """Whether a TIFF's ImageDescription is a writer's note on how it stored the pixels (tifffile's JSON
    shape, ImageJ's header), which would misdescribe the output, rather than a caption."""
    return isinstance(description, str) and description.lstrip().startswith(('{"shape"', "ImageJ="))


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


def _fill_hidden(rgb: np.ndarray, alpha: np.ndarray) -> None:
    """Repaint fully transparent pixels, in place, from their visible neighbours (a push-pull pyramid
    fill), so the colour a file keeps under alpha 0 cannot change the result; with nothing visible, grey."""
    hidden = alpha == 0
    if hidden.all():
        rgb.fill(0.5)
    elif hidden.any():
        height, width = alpha.shape
        bands = [slice(top, top + _BAND) for top in range(0, height, _BAND)]  # no full-size temporaries
        weighted = np.concatenate([_block_sums(rgb[rows] * alpha[rows, :, None]) for rows in bands])
        tall = _stretch(_push_pull(weighted, _block_sums(alpha)), 0, height)
        for rows in bands:
            np.copyto(rgb[rows], _stretch(tall[rows], 1, width), where=hidden[rows, :, None])


_BAND = 256  # rows at a time (even: 2×2 blocks do not straddle two bands)


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
    return _stretch(_stretch(values, 0, height), 1, width)


def _stretch(values: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Enlarge a pyramid level 2× along one axis to size, interpolating linearly between pixel centres."""
    last = values.shape[axis] - 1
    position = np.clip((np.arange(size) + 0.5) / 2 - 0.5, 0, last)
    low = np.floor(position).astype(np.intp)
    shape = [size if i == axis else 1 for i in range(values.ndim)]
    part = (position - low).astype(values.dtype).reshape(shape)
    below, above = np.take(values, low, axis), np.take(values, np.minimum(low + 1, last), axis)
    below *= 1 - part  # in place: these arrays can be as large as the picture
    above *= part
    below += above
    return below


def _grey_white(im: Image.Image) -> float:
    """White's value in a deep grey image: 1 in float, 2³¹ − 1 in a 32-bit integer TIFF (Pillow's
    signed mode I), else 65535 (16-bit, which Pillow may also open as mode I)."""
    if im.mode == "F":
        return 1.0
    bits = getattr(im, "tag_v2", {}).get(258, 16)  # TIFF BitsPerSample: a number, or one per band
    return 2.0**31 - 1 if im.mode == "I" and max(np.atleast_1d(bits)) == 32 else 65535.0


def _pillow_image(
    source: str | os.PathLike[str] | bytes, label: str, max_pixels: int
) -> tuple[np.ndarray, np.ndarray | None, SourceMetadata]:
    """Decode with Pillow (past 8 bits, with the format's own reader) to sRGB floats and alpha, with
    the metadata an output keeps."""
    with _open_image(source, label, max_pixels) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise _too_many_pixels(label, f"{width}×{height} = {width * height:,}", max_pixels)
        avif = _avif_description(source) if im.format == "AVIF" else None  # Pillow's reader omits these
        deep = _is_deep(im, avif)  # asked before decoding: Pillow's tiles say how many bits a channel has
        channels = _deep_channels(source, im, label, avif) if deep else None
        if channels is None:  # Pillow decodes: a deep TIFF's 8-bit copy would only take memory
            im.load()  # a TIFF comes upright from it, its Orientation tag gone
        nclx = avif.nclx if avif else im.info.get("nclx_profile")
        profile = im.info.get("icc_profile") or icc.from_nclx(nclx, label)
        bits = 16 if deep or im.mode in _GREY16_MODES or im.mode == "F" else 8
        kept = dataclasses.replace(_source_metadata(im.getexif, im.info.get("dpi")), bits=bits)
        if channels is not None:
            rgb, alpha = _deep_rgb(*channels, profile)
        else:  # turned as arrays: Pillow's exif_transpose rewrites the EXIF, failing on some it can read
            orientation = im.getexif().get(_Tag.Orientation, 1)
            colour, alpha = _split_alpha(im)
            rgb = _upright(_rgb_array(colour, profile, label), orientation)
            alpha = None if alpha is None else np.ascontiguousarray(_upright(alpha, orientation))
        _warn_if_animated(im, label)  # last: counting frames moves through the file
    return rgb, alpha, kept


def _tifffile_image(
    source: str | os.PathLike[str] | bytes, label: str, max_pixels: int
) -> tuple[np.ndarray, np.ndarray | None, SourceMetadata] | None:
    """A TIFF of floating-point samples (an HDR render's, a scientific camera's) or of 16-bit grey with
    alpha, read by tifffile: Pillow refuses these (32-bit float grey it reads, clipping it unsaid).
    Upright, its profile applied, its EXIF and resolution kept as Pillow's TIFFs' are. None for any
    other file: Pillow's to read, or to say what is wrong with it."""
    with _open_stream(source, label) as stream:
        if stream.read(4) not in _TIFF_HEADS:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's about damaged tags
                directory = _tiff_directory(stream)
                if not _beyond_pillow(directory):
                    return None
        except Exception:  # damaged (Pillow's parser raises many kinds): Pillow's reading says how
            return None
        from tifffile import EXTRASAMPLE, RESUNIT, TiffFile

        stream.seek(0)
        with TiffFile(stream) as tiff:
            page = tiff.pages[0]
            width, height = page.imagewidth, page.imagelength
            if width * height > max_pixels:
                raise _too_many_pixels(label, f"{width}×{height} = {width * height:,}", max_pixels)
            samples = _tiff_samples(page)
            if samples is None:
                compression = getattr(page.compression, "name", page.compression)  # a number: none known
                raise ImageError(f"cannot read image {label}: its {compression} compression needs the "
                                 "imagecodecs package")
            extra = page.extrasamples[:1]
            has_alpha = extra in ((EXTRASAMPLE.ASSOCALPHA,), (EXTRASAMPLE.UNASSALPHA,))
            colours = 3 if directory.get(262) == 2 else 1  # RGB, else grey
            samples = _upright(samples[..., :colours + has_alpha], directory.get(274, 1))
            colour, alpha = _channels(samples, extra == (EXTRASAMPLE.ASSOCALPHA,), label)
            if directory.get(262) == 0:  # grey whose 0 is white
                np.subtract(1.0, colour, out=colour)
            profile = page.tags.valueof(34675)  # InterColorProfile
            resolved = 282 in page.tags and page.resolutionunit in (RESUNIT.INCH, RESUNIT.CENTIMETER)
            dpi = page.get_resolution(RESUNIT.INCH) if resolved else None
            frames = len(tiff.pages)
        kept = _source_metadata(lambda: directory, dpi)
    _warn_of_frames(frames, "TIFF", label)
    rgb, alpha = _deep_rgb(colour, alpha, profile if isinstance(profile, bytes) else None)
    return rgb, alpha, dataclasses.replace(kept, bits=16)


_TIFF_HEADS = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # little- or big-endian, classic or BigTIFF


def _tiff_directory(stream: BinaryIO) -> Image.Exif:
    """A TIFF's first directory (its tags, the EXIF ones among them) read as Pillow's getexif reads an
    open TIFF's: from the byte order, kind (classic or BigTIFF) and offset its header gives."""
    stream.seek(0)
    head = stream.read(16)
    directory = Image.Exif()
    directory.endian = "<" if head[:2] == b"II" else ">"
    directory.bigtiff = b"+" in head[2:4]
    offset, = struct.unpack_from(directory.endian + ("Q" if directory.bigtiff else "I"), head,
                                 8 if directory.bigtiff else 4)
    directory.load_from_fp(stream, offset)
    return directory


def _beyond_pillow(directory: Image.Exif) -> bool:
    """Whether a TIFF's first directory describes pixels Pillow refuses or clips: floating-point grey or
    RGB (SampleFormat 3), or 16-bit unsigned grey with extra samples (alpha)."""
    photometric = directory.get(262)  # PhotometricInterpretation: 0 and 1 grey, 2 RGB
    formats = set(np.atleast_1d(directory.get(339, 1)))
    if formats == {3}:
        return photometric in (0, 1, 2)
    deep = formats == {1} and set(np.atleast_1d(directory.get(258, 1))) == {16}
    return photometric in (0, 1) and deep and 338 in directory  # ExtraSamples


def _is_deep(im: Image.Image, avif: _AvifDescription | None) -> bool:
    """Whether this is a PNG or TIFF with 16-bit colour (or grey with alpha), or a HEIF or AVIF with 10
    or 12 bits (a phone's HDR photo), which Pillow cuts to 8 bits (or, planar, misreads)."""
    if im.format == "HEIF":
        return im.info.get("bit_depth", 8) > 8
    if avif is not None:
        return avif.bits > 8
    if im.mode not in ("RGB", "RGBA", "LA"):
        return False
    if im.format == "TIFF":  # 16-bit unsigned integers (BitsPerSample, SampleFormat)
        tags = im.tag_v2
        return set(np.atleast_1d(tags.get(258, 8))) == {16} and set(np.atleast_1d(tags.get(339, 1))) == {1}
    return im.format == "PNG" and any(";16" in str(tile.args) for tile in im.tile)  # rawmode RGB;16B, …


def _deep_channels(
    source: str | os.PathLike[str] | bytes, im: Image.Image, label: str, avif: _AvifDescription | None
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A 16-bit PNG's or TIFF's, or a 10/12-bit HEIF's or AVIF's, colour (H×W×1 grey or ×3) and alpha,
    upright floats in [0, 1] at the precision Pillow cuts to 8 bits; None, after a warning, where
    tifffile lacks the TIFF's codec or imagecodecs AVIF."""
    premultiplied = False
    if im.format == "HEIF":
        samples = _heif_samples(source, label)
    if avif is not None:
        samples = _avif_samples(source, label, avif.bits)
        if samples is None:
            log.warning("image %s is read at 8 bits per channel, not %d (that needs the imagecodecs "
                        "package with AVIF)", label, avif.bits)
            return None
    if im.format == "PNG":
        samples, exif = _png_samples(source if isinstance(source, bytes) else Path(source).read_bytes())
        if exif is not None:  # else Pillow decodes the whole picture at 8 bits to look for it
            im.info.setdefault("exif", exif)
    orientation = im.getexif().get(_Tag.Orientation, 1)  # a TIFF's is gone once Pillow decodes it
    if im.format == "TIFF":
        import tifffile

        with tifffile.TiffFile(io.BytesIO(source) if isinstance(source, bytes) else source) as tiff:
            page = tiff.pages[0]
            samples = _tiff_samples(page)
            if samples is None:
                log.warning("image %s is read at 8 bits per channel (its %s compression needs the "
                            "imagecodecs package for 16)", label, im.info.get("compression"))
                return None
            samples = samples[..., :len(im.getbands())]  # past Pillow's bands: extra samples, no alpha
            premultiplied = page.extrasamples[:1] == (tifffile.EXTRASAMPLE.ASSOCALPHA,)
    samples = _upright(samples, orientation)
    colour, alpha = _channels(samples, premultiplied, label)
    key = im.info.get("transparency")  # a PNG's transparent colour (tRNS), in 16-bit values
    if alpha is None and key is not None:
        alpha = np.any(samples != key, axis=-1).astype(np.float32)
    return colour, alpha


def _tiff_samples(page: Any) -> np.ndarray | None:
    """A TIFF page's samples (a tifffile TiffPage's), H×W×C as stored: 16-bit or floating-point; None
    where tifffile lacks its codec."""
    import tifffile

    known = tifffile.TIFF
    if page.compression not in known.DECOMPRESSORS or page.predictor not in known.UNPREDICTORS:
        return None
    try:  # LZW, JPEG, zstd …: tifffile has them from imagecodecs
        samples = page.asarray(maxworkers=1)
    except ImportError:
        return None
    if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and samples.ndim == 3:
        samples = np.moveaxis(samples, 0, -1)
    return samples[..., None] if samples.ndim == 2 else samples


def _upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """A view of H×W(×C) pixels turned as their EXIF orientation says, to show them upright."""
    turns, mirror = _UPRIGHT.get(orientation, (0, False))
    return np.rot90(pixels, turns)[:, ::-1] if mirror else np.rot90(pixels, turns)


# EXIF orientation: quarter turns anticlockwise, then whether mirrored left to right, to show it upright
_UPRIGHT = {2: (0, True), 3: (2, False), 4: (2, True), 5: (3, True), 6: (3, False), 7: (1, True),
            8: (1, False)}
# A 16-bit PNG's colour type: the mode and raw modes Pillow's PNG decoder gives its samples' high and low
# bytes in (grey+alpha: a sample's two bytes as two 8-bit channels)
_PNG_BYTES = {2: ("RGB", ("RGB;16B", "RGB;16L")), 4: ("RGBA", ("RGBA",)),
              6: ("RGBA", ("RGBA;16B", "RGBA;16L"))}


def _channels(samples: np.ndarray, premultiplied: bool, label: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Colour (H×W×1 grey or ×3) and alpha (a further channel, where there is one) as floats in [0, 1]
    from 16-bit or floating-point samples (H×W×C); premultiplied colour has alpha divided out."""
    if samples.dtype.kind == "f":
        _check_floats(samples, label)
    colours = 1 if samples.shape[2] <= 2 else 3
    colour = _unit_floats(samples[..., :colours])
    if samples.shape[2] == colours:
        return colour, None
    alpha = _unit_floats(samples[..., colours])
    if premultiplied:  # colour stored multiplied by alpha: as Pillow does at 8 bits, divided out
        np.divide(colour, alpha[..., None], out=colour, where=alpha[..., None] > 0)
        np.minimum(colour, 1.0, out=colour)
    return colour, alpha


def _check_floats(samples: np.ndarray, label: str) -> None:
    """Refuse floating-point samples that are NaN or infinite (no colour to show, nor to style), and
    say that values outside [0, 1] (an HDR render's highlights, a negative) are clipped."""
    if not np.isfinite(samples).all():
        raise ImageError(f"image {label} has NaN or infinite sample values, which have no colour")
    low, high = float(samples.min()), float(samples.max())
    if low < 0.0 or high > 1.0:
        log.warning("image %s has values from %g to %g: those outside 0–1 are clipped (HDR highlights "
                    "lose their detail)", label, low, high)


def _heif_samples(source: str | os.PathLike[str] | bytes, label: str) -> np.ndarray:
    """A deep HEIF's primary image as 16-bit samples (H×W×C, upright: libheif turns it), decoded
    again by pi-heif, whose Pillow plugin gives 8 bits only."""
    import pi_heif

    try:
        heif = pi_heif.open_heif(io.BytesIO(source) if isinstance(source, bytes) else source,
                                 convert_hdr_to_8bit=False, hdr_to_16bit=False)
        primary = heif[heif.primary_index]
        # Copied while `primary` lives: numpy's view would be of libheif's buffer, freed with it.
        samples = np.asarray(primary).astype(np.uint32)
    except (OSError, ValueError, RuntimeError, EOFError) as e:  # libheif's, as its Pillow plugin sees them
        raise _corrupt(label, e) from e
    return _stretched(samples, primary.info["bit_depth"])


def _avif_samples(source: str | os.PathLike[str] | bytes, label: str, bits: int) -> np.ndarray | None:
    """A deep AVIF's image as 16-bit samples (H×W×C, as stored: its rotation and mirroring, which
    Pillow's reader gives as an EXIF orientation, are left to the caller), decoded again by imagecodecs'
    libavif, as Pillow's reader gives 8 bits only; None where imagecodecs was built without AVIF."""
    import imagecodecs

    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        samples = imagecodecs.avif_decode(data)
    except ImportError:
        return None
    except (RuntimeError, ValueError) as e:  # imagecodecs' AvifError: damaged
        raise _corrupt(label, e) from e
    return _stretched(samples, bits)


def _stretched(samples: np.ndarray, bits: int) -> np.ndarray:
    """10- or 12-bit samples as 16-bit ones (H×W×C) stretched so that white is 65535 (a shift would
    leave it at 65472)."""
    top = (1 << bits) - 1
    wide = samples.astype(np.uint32, copy=False)
    samples = ((wide * 65535 + top // 2) // top).astype(np.uint16)
    return samples[..., None] if samples.ndim == 2 else samples


def _png_samples(png: bytes) -> tuple[np.ndarray, bytes | None]:
    """A 16-bit PNG's samples (H×W×C) through Pillow's PNG decoder, which unpacks a sample's high byte
    (big-endian), then its low one (as little-endian); libpng, through torchvision, crashes on a bad CRC.
    Also its EXIF: an eXIf chunk's, b"" where it has none, None where it is kept as ImageMagick and
    exiv2 do, in a text chunk (Pillow reads that one)."""
    chunks = list(_png_chunks(png))
    width, height, _, colour_type, _, _, interlaced = struct.unpack(">IIBBBBB", chunks[0][1])
    pixel_data = b"".join(body for kind, body in chunks if kind == b"IDAT")
    mode, rawmodes = _PNG_BYTES[colour_type]
    planes = [np.asarray(Image.frombytes(mode, (width, height), pixel_data, "zip", rawmode, interlaced))
              for rawmode in rawmodes]
    exif = next((bytes(body) for kind, body in chunks if kind == b"eXIf"), None)
    if exif is None and not any(kind in (b"tEXt", b"zTXt", b"iTXt") and bytes(body[:22]) == _RAW_EXIF
                                for kind, body in chunks):
        exif = b""  # none, in either form
    return np.stack(planes, axis=-1).reshape(height, width, -1).view(">u2"), exif


_RAW_EXIF = b"Raw profile type exif\0"  # the keyword of a PNG text chunk holding EXIF as hex


@dataclasses.dataclass(frozen=True)
class _AvifDescription:
    """What an AVIF's item properties say that Pillow's reader does not pass on."""

    bits: int  # per channel: 8, 10 or 12
    nclx: dict[str, int] | None  # primaries and transfer codes (Display P3's, …); None where it has none


def _avif_description(source: str | os.PathLike[str] | bytes) -> _AvifDescription:
    """An AVIF's depth, from its first AV1 configuration ('av1C', the image's; its alpha's has the same)
    high_bitdepth and twelve_bit flags, and its nclx 'colr' property, from one read of its boxes."""
    bits, nclx = None, None
    for kind, body in _avif_properties(source):
        if kind == b"av1C" and len(body) >= 3 and bits is None:
            bits = (12 if body[2] & 0x20 else 10) if body[2] & 0x40 else 8
        if kind == b"colr" and body[:4] == b"nclx" and len(body) >= 8 and nclx is None:
            primaries, transfer = struct.unpack_from(">HH", body, 4)
            nclx = {"color_primaries": primaries, "transfer_characteristics": transfer}
    return _AvifDescription(bits or 8, nclx)


def _avif_properties(source: str | os.PathLike[str] | bytes) -> list[tuple[bytes, bytes]]:
    """An AVIF's item properties (kind and body of each box in meta/iprp/ipco), in file order."""
    with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as stream:
        meta = _top_level_box(stream, b"meta")
    boxes = [meta[4:]] if meta else []  # meta is a full box: its version and flags come first
    for kind in (b"iprp", b"ipco"):
        boxes = [body for box in boxes for found, body in _iso_boxes(box) if found == kind]
    return [found for box in boxes for found in _iso_boxes(box)]


def _top_level_box(stream: BinaryIO, wanted: bytes, limit: int = 1 << 20) -> bytes | None:
    """The body of an ISO media file's first top-level box of a kind (up to `limit` bytes of it),
    stepping over the others (a picture's data may come first)."""
    while len(header := stream.read(8)) == 8:
        size, kind = struct.unpack(">I4s", header)
        header_size = 8
        if size == 1:  # a 64-bit size follows
            extended = stream.read(8)
            if len(extended) < 8:
                return None
            size, header_size = struct.unpack(">Q", extended)[0], 16
        body = size - header_size if size else limit  # 0: the box runs to the end of the file
        if body < 0:
            return None
        if kind == wanted:
            return stream.read(min(body, limit))
        if not size:
            return None
        stream.seek(body, os.SEEK_CUR)
    return None


def _iso_boxes(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The boxes in an ISO media box's body: kind and body, as far as the data holds whole ones."""
    position = 0
    while position + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, position)
        header = 8
        if size == 1 and position + 16 <= len(data):
            size, header = struct.unpack_from(">Q", data, position + 8)[0], 16
        elif size == 0:
            size = len(data) - position
        if size < header or position + size > len(data):
            return
        yield kind, data[position + header:position + size]
        position += size


def _png_chunks(png: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """A PNG's chunks, kind and body (a view: a large photo's are not copied), in file order."""
    view, position = memoryview(png), 8
    while position + 8 <= len(view):
        length, kind = struct.unpack_from(">I4s", view, position)
        yield kind, view[position + 8:position + 8 + length]
        position += 12 + length


def _unit_floats(samples: np.ndarray) -> np.ndarray:
    """16-bit or floating-point samples as float32 in [0, 1] (floats clipped to it), made in one pass
    (a 50-megapixel photo's are 600 MB)."""
    values = np.empty(samples.shape, np.float32)
    if samples.dtype.kind == "f":
        np.clip(samples, 0.0, 1.0, out=values)
    else:
        np.divide(samples, np.float32(65535), out=values)
    return values


def _deep_rgb(
    colour: np.ndarray, alpha: np.ndarray | None, profile: bytes | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """sRGB from 16-bit grey or RGB colour (converted in place), the profile applied; alpha as it is."""
    if colour.shape[2] == 1:
        return _grey_rgb(colour[..., 0], profile), alpha
    if profile:
        icc.deep_to_srgb(colour, profile)
    return colour, alpha


def _grey_rgb(grey: np.ndarray, profile: bytes | None) -> np.ndarray:
    """Deep grey values in [0, 1] as sRGB's three equal channels, a grey profile applied."""
    if profile:
        grey = icc.grey_to_srgb(grey, profile)
    return np.repeat(grey.astype(np.float32)[..., None], 3, axis=2)


def _rgb_array(im: Image.Image, profile: bytes | None, label: str) -> np.ndarray:
    """Turn an alpha-free image of any mode into float sRGB, keeping 16-bit grey precision."""
    if im.mode in _GREY16_MODES or im.mode == "F":
        grey = np.asarray(im).astype(np.float32)  # float32: exact for 16-bit values, half float64's memory
        grey /= _grey_white(im)
        np.clip(grey, 0.0, 1.0, out=grey)
        if getattr(im, "tag_v2", {}).get(262) == 0:  # a TIFF's "min is white", left to us past 8 bits
            np.subtract(1.0, grey, out=grey)
        return _grey_rgb(grey, profile)
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
    """Pillow's 8-bit PNG, with its metadata chunks, carrying 16-bit pixels (H×W×C, changed in place)
    instead: IHDR says 16 bits and one IDAT holds them, each row 'Up'-filtered (the difference to the row
    above)."""
    if sys.byteorder == "little":
        pixels.byteswap(inplace=True)  # PNG's samples are big-endian (the array is this call's to change)
    rows = pixels.reshape(pixels.shape[0], -1).view(np.uint8)
    compressor, parts, above = zlib.compressobj(6), [], np.zeros(rows.shape[1], np.uint8)
    for top in range(0, rows.shape[0], _BAND):  # a band at a time: no filtered copy of a whole photo
        band = rows[top:top + _BAND]
        filtered = np.empty((band.shape[0], band.shape[1] + 1), np.uint8)
        filtered[:, 0] = 2
        np.subtract(band[0], above, out=filtered[0, 1:])  # modulo 256, as PNG filters are
        np.subtract(band[1:], band[:-1], out=filtered[1:, 1:])
        parts.append(compressor.compress(filtered))
        above = band[-1]
    pixel_data: bytes | None = b"".join([*parts, compressor.flush()])
    chunks = [png[:8]]
    for kind, view in _png_chunks(png):
        if kind == b"IDAT":
            if pixel_data is None:
                continue
            body, pixel_data = pixel_data, None
        else:
            body = bytes(view)
        if kind == b"IHDR":
            body = body[:8] + b"\x10" + body[9:]
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
    return b"".join([data, memoryview(np.ascontiguousarray(pixels.astype("<u2", copy=False)))])


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
    options = _save_options(fmt, im.size, metadata, source, quality)
    if deep and fmt == "PNG":
        options["compress_level"] = 0  # its pixels are thrown away
    buffer = io.BytesIO()
    try:
        im.save(buffer, format=fmt, **options)
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot encode {label} as {fmt}: {e}") from e
    eight_bits = buffer.getvalue()
    if not deep:
        return eight_bits
    del im, buffer  # a large photo's 8-bit copies: not kept beside the 16-bit ones
    try:
        return (_deep_png if fmt == "PNG" else _deep_tiff)(eight_bits, _quantise(planes, 16, label))
    # Pillow laid its TIFF out otherwise (one strip no more, a tag missing, an offset past the end):
    except (ValueError, KeyError, struct.error) as e:  # the run's result matters more than its depth
        log.warning("%s is written with 8 bits per channel, not 16 (%s)", label, e)
        return eight_bits


def _write_atomically(target: Path, data: bytes, label: str) -> None:
    """Write whole or not at all, with disk errors as one-line ImageErrors."""
    try:
        write_bytes(target, data)
    except OSError as e:
        raise ImageError(f"cannot save {label}: {e.strerror or e}") from e
