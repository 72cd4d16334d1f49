"""Colour profiles: what an image says about its colours (an ICC profile, or a HEIF's nclx colour
description), turned into sRGB, through LittleCMS at 8 bits or in floating point at 16.

This module knows colours only; files and their formats live in image.py.
"""

from __future__ import annotations

import functools
import io
import logging
import struct
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image, ImageCms

log = logging.getLogger(__name__)

SPACES = {"RGB": "RGB ", "L": "GRAY", "CMYK": "CMYK"}  # the Pillow modes a profile can apply to
_NO_OPTIMISATION = 0x0100  # LittleCMS's cmsFLAGS_NOOPTIMIZE: optimised, its 16-bit grey curves err up to 4%


def to_srgb(im: Image.Image, icc: bytes) -> Image.Image:
    """Apply an embedded RGB/grey/CMYK profile; a broken or mismatched one changes nothing."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space != SPACES[im.mode]:
            return im
        return ImageCms.profileToProfile(
            im, profile, ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    except (ImageCms.PyCMSError, OSError, ValueError):
        return im


def grey_to_srgb(grey: np.ndarray, icc: bytes) -> np.ndarray:
    """Apply an embedded grey profile to deep grey values in [0, 1] at full precision: its tone curve,
    sampled through LittleCMS at 16 bits (Pillow's RGB transforms have 8) and interpolated; a
    broken or non-grey profile changes nothing."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space != "GRAY":
            return grey
        transform = ImageCms.buildTransform(profile, _srgb_grey_profile(), "I;16", "I;16",
                                            flags=_NO_OPTIMISATION)
        ramp = Image.fromarray(np.arange(65536, dtype=np.uint16).reshape(256, 256))
        curve = np.asarray(ImageCms.applyTransform(ramp, transform), dtype=np.float64).ravel()
    except (ImageCms.PyCMSError, OSError, ValueError):
        return grey
    return np.interp(grey, np.linspace(0.0, 1.0, 65536), curve / 65535.0)


@functools.cache
def _srgb_grey_profile() -> ImageCms.ImageCmsProfile:
    """A grey ICC profile with sRGB's tone curve, which Pillow cannot create: grey converted into it
    at 16 bits is the grey of sRGB."""
    return ImageCms.ImageCmsProfile(io.BytesIO(_profile(b"GRAY", [(b"kTRC", _SRGB_CURVE)])))


def _s15(value: float) -> bytes:
    """ICC's s15Fixed16Number."""
    return struct.pack(">i", round(value * 65536))


_D50 = (0.9642, 1.0, 0.8249)  # ICC's connection-space white
_SRGB_CURVE = b"para" + bytes(4) + struct.pack(">HH", 3, 0) + b"".join(  # ICC parametric curve type 3
    map(_s15, (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)))
_SRGB_PRIMARIES = (0.64, 0.33, 0.30, 0.60, 0.15, 0.06, 0.3127, 0.3290)  # red, green, blue, white (x, y)
_BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])


def _gamma_curve(gamma: float) -> bytes:
    """An ICC tone curve that is a pure power (ICC parametric curve type 0)."""
    return b"para" + bytes(4) + struct.pack(">HH", 0, 0) + _s15(gamma)


# HEIF's transfer characteristics (ITU-T H.273) that are not sRGB's curve or read as it (BT.709's).
_NCLX_CURVES = {4: _gamma_curve(2.2), 5: _gamma_curve(2.8), 8: _gamma_curve(1.0)}
_HDR_TRANSFERS = {16: "PQ", 18: "HLG"}
# H.273's colour primaries by code, for a description that gives only the code (an AVIF's): x, y as above
_D65 = (0.3127, 0.3290)
_NCLX_PRIMARIES = {1: _SRGB_PRIMARIES, 2: _SRGB_PRIMARIES, 5: (0.64, 0.33, 0.29, 0.60, 0.15, 0.06, *_D65),
                   6: (0.630, 0.340, 0.310, 0.595, 0.155, 0.070, *_D65),
                   7: (0.630, 0.340, 0.310, 0.595, 0.155, 0.070, *_D65),
                   9: (0.708, 0.292, 0.170, 0.797, 0.131, 0.046, *_D65),
                   11: (0.680, 0.320, 0.265, 0.690, 0.150, 0.060, 0.314, 0.351),
                   12: (0.680, 0.320, 0.265, 0.690, 0.150, 0.060, *_D65)}


def _profile(space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """A minimal ICC v2 display profile (D50 white) in `space` from its tags; Pillow can create only
    sRGB, Lab and XYZ ones."""
    tags = [(b"wtpt", _xyz_tag(_D50)), *tags]
    offset = 128 + 4 + 12 * len(tags)
    table = data = b""
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = struct.pack(">I4sI4s4s4s", offset + len(data), b"", 0x02100000, b"mntr", space, b"XYZ ")
    header += bytes(12) + b"acsp" + bytes(28) + b"".join(map(_s15, _D50))  # the illuminant at byte 68
    return header + bytes(128 - len(header)) + struct.pack(">I", len(tags)) + table + data


def _xyz_tag(xyz: Iterable[float]) -> bytes:
    """An ICC XYZ tag (a colorant or the white point)."""
    return b"XYZ " + bytes(4) + b"".join(_s15(float(v)) for v in xyz)


def _rgb_to_d50(xy: list[float]) -> np.ndarray:
    """The matrix from linear RGB to XYZ seen under D50 (Bradford-adapted, as ICC profiles hold it) for
    red, green, blue and white chromaticities (x, y each)."""
    pairs = zip(xy[0::2], xy[1::2], strict=True)
    columns = np.array([[x / y, 1.0, (1.0 - x - y) / y] for x, y in pairs]).T
    primaries, white = columns[:, :3], columns[:, 3]
    to_xyz = primaries * np.linalg.solve(primaries, white)  # each primary scaled so r+g+b is white
    cone, cone_d50 = _BRADFORD @ white, _BRADFORD @ np.array(_D50)
    return np.linalg.solve(_BRADFORD, np.diag(cone_d50 / cone) @ _BRADFORD) @ to_xyz


def deep_to_srgb(rgb: np.ndarray, icc: bytes) -> None:
    """Convert 16-bit colour (floats in [0, 1], H×W×3) to sRGB in place, a band of rows at a time (a large
    photo's float copies are gigabytes), applying an embedded RGB profile at full precision where it is
    tone curves and a matrix (as RGB working spaces are: Adobe RGB, ProPhoto, Display P3), else through
    LittleCMS at 8 bits; a broken or mismatched one changes nothing."""
    try:
        curves, to_d50 = _matrix_shaper(icc)
        probe = np.linspace(0.0, 1.0, 257, dtype=np.float32)
        with np.errstate(all="ignore"):  # a broken curve's infinities and NaNs are caught just below
            shapes = [curve(probe) for curve in curves]
        if not all(np.all(np.isfinite(shape)) for shape in shapes):
            raise ValueError("a tone curve without values (a broken profile)")
    except (ValueError, KeyError, IndexError, ZeroDivisionError, struct.error):
        eight = Image.fromarray(np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8))
        converted = to_srgb(eight, icc)
        if converted is not eight:
            rgb[...] = np.asarray(converted, dtype=np.float32) / 255.0
        return
    srgb = _srgb_decode(probe)
    if np.allclose(to_d50, _srgb_to_d50(), atol=1e-4) and np.allclose(shapes, srgb, atol=1e-4):
        return  # sRGB already (every stylekit output embeds it): converting would change nothing
    to_srgb_linear = np.linalg.solve(_srgb_to_d50(), to_d50).T.astype(np.float32)
    rows = max(1, _BLOCK // rgb.shape[1])
    for top in range(0, rgb.shape[0], rows):
        band = rgb[top:top + rows]
        linear = np.stack([curve(band[..., i]) for i, curve in enumerate(curves)], axis=-1, dtype=np.float32)
        band[...] = _srgb_encode(np.clip(linear @ to_srgb_linear, 0.0, 1.0))


_BLOCK = 1 << 20  # pixels converted at a time, so a large photo's float temporaries stay small


def _srgb_decode(values: np.ndarray) -> np.ndarray:
    """sRGB's tone curve backwards, from the values a file stores to linear light."""
    return np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)


def _srgb_encode(linear: np.ndarray) -> np.ndarray:
    """sRGB's tone curve, from linear light to the values a file stores."""
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


@functools.cache
def _srgb_to_d50() -> np.ndarray:
    """sRGB's matrix to XYZ (D50) as LittleCMS holds it, so sRGB-tagged deep pixels come back unchanged."""
    return _matrix_shaper(srgb_profile())[1]


def _matrix_shaper(icc: bytes) -> tuple[list[Callable[[np.ndarray], np.ndarray]], np.ndarray]:
    """An RGB profile's three tone curves and its matrix to XYZ (D50); ValueError for any other kind
    (one with lookup tables, which LittleCMS would use instead)."""
    if icc[16:20] != b"RGB " or icc[36:40] != b"acsp":
        raise ValueError("not an RGB profile")
    count, = struct.unpack_from(">I", icc, 128)
    tags = {}
    for index in range(count):
        signature, offset, size = struct.unpack_from(">4sII", icc, 132 + 12 * index)
        tags[signature] = icc[offset:offset + size]
    if b"A2B0" in tags:
        raise ValueError("a lookup-table profile")
    columns = []
    for signature in (b"rXYZ", b"gXYZ", b"bXYZ"):
        if tags[signature][:4] != b"XYZ ":
            raise ValueError("not a colorant")
        columns.append([value / 65536 for value in struct.unpack_from(">3i", tags[signature], 8)])
    return [_tone_curve(tags[signature]) for signature in (b"rTRC", b"gTRC", b"bTRC")], np.array(columns).T


def _tone_curve(tag: bytes) -> Callable[[np.ndarray], np.ndarray]:
    """An ICC tone curve (curv or para) as a function of values in [0, 1]."""
    if tag[:4] == b"curv":
        count, = struct.unpack_from(">I", tag, 8)
        if count == 0:
            return lambda v: v
        if count == 1:
            gamma = struct.unpack_from(">H", tag, 12)[0] / 256
            return lambda v: v ** gamma
        table = np.frombuffer(tag, ">u2", count, 12) / 65535.0
        return lambda v: np.interp(v, np.linspace(0.0, 1.0, count), table)
    if tag[:4] != b"para":
        raise ValueError("not a tone curve")
    kind, = struct.unpack_from(">H", tag, 8)
    p = [value / 65536 for value in struct.unpack_from(f">{(1, 3, 4, 5, 7)[kind]}i", tag, 12)]
    # Every type is Y = (aX + b)^g + e from X = d on, else cX + f, with some numbers fixed:
    g, a, b, c, d, e, f = {0: lambda: (p[0], 1.0, 0.0, 0.0, 0.0, 0.0, 0.0),
                           1: lambda: (*p, 0.0, -p[2] / p[1], 0.0, 0.0),
                           2: lambda: (*p[:3], 0.0, -p[2] / p[1], p[3], p[3]),
                           3: lambda: (*p, 0.0, 0.0),
                           4: lambda: tuple(p)}[kind]()
    return lambda v: np.where(v >= d, np.maximum(a * v + b, 0.0) ** g + e, c * v + f)


def from_nclx(nclx: object, label: str) -> bytes | None:
    """An ICC profile for the colour description (nclx) a HEIF or AVIF photo may carry instead of a
    profile, such as a phone's Display P3; None where it already is sRGB (or says nothing usable).
    Its primaries are read as chromaticities (pi-heif gives them), else from their code."""
    if not isinstance(nclx, dict):
        return None
    transfer = nclx.get("transfer_characteristics")
    if transfer in _HDR_TRANSFERS:
        log.warning("image %s is HDR (%s): it is read without tone mapping, so its colours may look flat",
                    label, _HDR_TRANSFERS[transfer])
    curve = _NCLX_CURVES.get(transfer, _SRGB_CURVE)
    try:
        keys = [f"color_primary_{c}_{axis}" for c in ("red", "green", "blue", "white") for axis in "xy"]
        xy = ([float(nclx[key]) for key in keys] if all(key in nclx for key in keys)
              else list(_NCLX_PRIMARIES[nclx.get("color_primaries", 2)]))
        if nclx.get("color_primaries") in (1, 2) or np.allclose(xy, _SRGB_PRIMARIES, atol=1e-3):
            xy = list(_SRGB_PRIMARIES)  # sRGB's (BT.709), or unspecified: read as sRGB
            if curve is _SRGB_CURVE:
                return None
        to_d50 = _rgb_to_d50(xy)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, np.linalg.LinAlgError):
        return None
    if not np.all(np.isfinite(to_d50)):
        return None
    tags = [(tag, _xyz_tag(to_d50[:, i])) for i, tag in enumerate((b"rXYZ", b"gXYZ", b"bXYZ"))]
    return _profile(b"RGB ", [*tags, (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)])


@functools.cache
def srgb_profile() -> bytes:
    """The sRGB profile every output embeds, so apps working in a wider space show it right."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
