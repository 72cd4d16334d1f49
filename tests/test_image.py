"""Tests for stylekit.image: decoding every input we promise, and safe, faithful writing."""

from __future__ import annotations

import concurrent.futures
import io
import logging
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import ExifTags, Image, ImageCms, ImageOps

from stylekit import icc, image
from stylekit.errors import StylekitError
from stylekit.image import (
    ImageError,
    LoadedImage,
    encode_png,
    load_image,
    output_format,
    output_suffix,
    read_metadata,
    save_image,
)

# Adobe RGB (1998) colorants adapted to D50, and lcms' built-in sRGB colorants (also D50).
ADOBE_COLORANTS = [
    (0.60974, 0.31111, 0.01947),
    (0.20528, 0.62567, 0.06087),
    (0.14919, 0.06322, 0.74457),
]
ADOBE_GAMMA = 563 / 256
SRGB_COLORANTS = [
    (0.436066, 0.222488, 0.013916),
    (0.385147, 0.716873, 0.097076),
    (0.143066, 0.060608, 0.714096),
]
D50 = (0.9642, 1.0, 0.8249)
METADATA = {"style": "Sternennacht ★", "weights": [1.0, 0.5], "steps": 300, "extra": {"seed": None}}


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz_tag(xyz: tuple[float, float, float]) -> bytes:
    return b"XYZ " + bytes(4) + b"".join(_s15(c) for c in xyz)


def _display_profile(space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """A minimal ICC v2 display profile for a colour space ("RGB " or "GRAY") with the given tags."""
    text = b"stylekit test profile\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    tags = [(b"desc", desc), (b"wtpt", _xyz_tag(D50)), *tags]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = struct.pack(">I", offset + len(data)) + bytes(4) + struct.pack(">I", 0x02100000)
    header += b"mntr" + space + b"XYZ " + bytes(12) + b"acsp" + bytes(28) + b"".join(_s15(c) for c in D50)
    return header + bytes(128 - len(header)) + struct.pack(">I", len(tags)) + table + data


def _gamma_curve(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)


def _matrix_trc_profile(colorants: list[tuple[float, float, float]], gamma: float) -> bytes:
    """A minimal ICC v2 RGB display profile (matrix + single-gamma curves)."""
    tags = [(sig, _xyz_tag(c)) for sig, c in zip((b"rXYZ", b"gXYZ", b"bXYZ"), colorants, strict=True)]
    tags += [(sig, _gamma_curve(gamma)) for sig in (b"rTRC", b"gTRC", b"bTRC")]
    return _display_profile(b"RGB ", tags)


def _srgb_encode(linear: np.ndarray) -> np.ndarray:
    """The sRGB transfer curve, linear light to encoded values."""
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def _jpeg_bytes(im: Image.Image) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format="JPEG")
    return buffer.getvalue()


def _exif_with_thumbnail(thumbnail: bytes) -> bytes:
    """EXIF as a camera writes it: orientation in the first directory, a JPEG thumbnail in the second."""
    ifd0 = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack("<I", 26)
    ifd1 = struct.pack("<H", 2) + struct.pack("<HHII", 0x0201, 4, 1, 56)
    ifd1 += struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail)) + struct.pack("<I", 0)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd0 + ifd1 + thumbnail


def _camera_exif() -> Image.Exif:
    """What a camera records about a photo (the Exif and GPS directories included)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Canon"
    exif[ExifTags.Base.Model] = "EOS R5"
    exif[ExifTags.Base.DateTime] = "2024:05:06 07:08:09"
    exif[ExifTags.Base.Artist] = "Ada"
    exif[ExifTags.Base.Copyright] = "(c) Ada"
    exif[ExifTags.IFD.Exif] = {ExifTags.Base.DateTimeOriginal: "2024:05:06 07:08:09",
                               ExifTags.Base.MakerNote: b"maker's own bytes"}
    exif[ExifTags.IFD.GPSInfo] = {ExifTags.GPS.GPSLatitudeRef: "N"}
    return exif


def _gradient(height: int = 32, width: int = 48) -> np.ndarray:
    """A smooth float RGB test image that lossy codecs reproduce closely."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / (width - 1), y / (height - 1), 1 - x / (width - 1) * 0.5], axis=2)
    return np.ascontiguousarray(rgb, dtype=np.float32)


def _png_bytes(im: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def _random_rgb8(height: int = 32, width: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- loading ------------------------------------------------------------------------------


def test_loaded_rgb_matches_source_pixels(tmp_path: Path) -> None:
    pixels = _random_rgb8()
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    loaded = load_image(path)
    assert isinstance(loaded, LoadedImage)
    assert loaded.rgb.dtype == np.float32
    assert loaded.rgb.flags.c_contiguous
    assert loaded.rgb.shape == (32, 32, 3)
    np.testing.assert_allclose(loaded.rgb, pixels / 255.0, atol=1e-6)
    assert loaded.alpha is None
    assert loaded.name == "photo.png"


def test_loading_from_str_path_gives_same_pixels(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    Image.fromarray(_random_rgb8()).save(path)
    np.testing.assert_array_equal(load_image(str(path)).rgb, load_image(path).rgb)


def test_alpha_kept_from_rgba(tmp_path: Path) -> None:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = np.arange(32, dtype=np.uint8)[None, :] * 8
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba).save(path)
    loaded = load_image(path)
    assert loaded.alpha is not None
    assert loaded.alpha.dtype == np.float32
    assert loaded.alpha.shape == (32, 32)
    np.testing.assert_allclose(loaded.alpha, rgba[..., 3] / 255.0, atol=1e-6)
    np.testing.assert_allclose(loaded.rgb[..., 0], 200 / 255.0, atol=1e-6)


def test_alpha_kept_from_palette_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (32, 32), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    im.paste(0, (0, 0, 16, 32))
    path = tmp_path / "sprite.png"
    im.save(path, transparency=0)
    loaded = load_image(path)
    assert loaded.alpha is not None
    assert np.all(loaded.alpha[:, :16] == 0.0)
    assert np.all(loaded.alpha[:, 16:] == 1.0)
    np.testing.assert_allclose(loaded.rgb[0, 20], [1.0, 0.0, 0.0])


def test_palette_without_transparency_has_no_alpha(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    Image.fromarray(_random_rgb8()).convert("P").save(path)
    assert load_image(path).alpha is None


def test_grey_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
    path = tmp_path / "grey.png"
    Image.fromarray(grey).save(path)
    rgb = load_image(path).rgb
    assert rgb.shape == (32, 32, 3)
    for channel in range(3):
        np.testing.assert_allclose(rgb[..., channel], grey / 255.0, atol=1e-6)


def test_grey_with_alpha_keeps_alpha(tmp_path: Path) -> None:
    path = tmp_path / "grey_alpha.png"
    Image.new("LA", (32, 32), (100, 50)).save(path)
    loaded = load_image(path)
    np.testing.assert_allclose(loaded.rgb, 100 / 255.0, atol=1e-6)
    assert loaded.alpha is not None
    np.testing.assert_allclose(loaded.alpha, 50 / 255.0, atol=1e-6)


def test_sixteen_bit_grey_keeps_values_beyond_8_bit_precision(tmp_path: Path) -> None:
    values = (np.arange(32 * 32, dtype=np.uint16) + 30000).reshape(32, 32)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    rgb = load_image(path).rgb
    np.testing.assert_allclose(rgb[..., 0], values / 65535.0, atol=1e-7)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    # neighbouring 16-bit values stay distinct, which 8-bit decoding would merge
    assert rgb[0, 1, 0] > rgb[0, 0, 0]


def test_thirty_two_bit_grey_tiff_keeps_its_tones(tmp_path: Path) -> None:
    values = (np.arange(32 * 32, dtype=np.int32) * 2_000_000).reshape(32, 32)  # up to 2³¹ − 1
    path = tmp_path / "deep.tif"
    Image.fromarray(values).save(path)
    rgb = load_image(path).rgb
    np.testing.assert_allclose(rgb[..., 1], values / (2**31 - 1), atol=1e-6)


def test_sixteen_bit_grey_transparent_colour_becomes_alpha(tmp_path: Path) -> None:
    values = np.full((32, 32), 40000, dtype=np.uint16)
    values[:, :8] = 1234
    path = tmp_path / "deep_trns.png"
    Image.fromarray(values).save(path, transparency=1234)
    loaded = load_image(path)
    assert loaded.alpha is not None
    assert np.all(loaded.alpha[:, :8] == 0.0)
    assert np.all(loaded.alpha[:, 8:] == 1.0)


def test_cmyk_jpeg_loads_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, quality=95)
    loaded = load_image(path)
    assert loaded.rgb.shape == (32, 32, 3)
    np.testing.assert_allclose(loaded.rgb[16, 16], [1.0, 0.0, 0.0], atol=0.03)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("1", ".png"),
        ("L", ".png"),
        ("I", ".tif"),
        ("F", ".tif"),
        ("YCbCr", ".tif"),
        ("CMYK", ".tif"),
        ("I;16B", ".tif"),
        ("RGB", ".webp"),
    ],
)
def test_every_supported_mode_loads_as_float_rgb_in_unit_range(
    tmp_path: Path, mode: str, suffix: str
) -> None:
    path = tmp_path / f"mode{suffix}"
    Image.new(mode, (32, 32)).save(path)
    rgb = load_image(path).rgb
    assert rgb.shape == (32, 32, 3)
    assert rgb.dtype == np.float32
    assert 0.0 <= rgb.min() <= rgb.max() <= 1.0


def test_exif_orientation_6_rotates(tmp_path: Path) -> None:
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:4, :4] = (255, 0, 0)  # stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "phone.png"
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    rgb = load_image(path).rgb
    assert rgb.shape == (64, 32, 3)
    np.testing.assert_allclose(rgb[0, 31], [1.0, 0.0, 0.0])  # now the top-right corner
    np.testing.assert_allclose(rgb[0, 0], [0.0, 0.0, 0.0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_turns_a_jpeg_as_pillow_does(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(_random_rgb8(24, 40)).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "photo.jpg")), dtype=np.float32) / 255
    np.testing.assert_allclose(load_image(tmp_path / "photo.jpg").rgb, expected, atol=1e-6)


def test_a_jpeg_whose_exif_pillow_cannot_write_back_still_loads_upright(tmp_path: Path) -> None:
    """A camera's EXIF with a tag of an unexpected type (ImageLength as text): Pillow reads it, but
    its exif_transpose fails writing the EXIF back."""
    after = 8 + 2 + 2 * 12 + 4  # where the text goes: past the header and the directory
    entries = [(0x0101, 2, 6, struct.pack(">I", after)), (0x0112, 3, 1, struct.pack(">HH", 6, 0))]
    ifd = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HHI", *entry[:3]) + entry[3]
                                                     for entry in entries) + bytes(4)
    exif = b"MM\0*" + struct.pack(">I", 8) + ifd + b"Canon\0"
    pixels = _random_rgb8(24, 40)
    Image.fromarray(pixels).save(tmp_path / "plain.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "camera.jpg", exif=b"Exif\0\0" + exif, quality=95)
    with pytest.raises(struct.error):  # what this test stands for
        ImageOps.exif_transpose(Image.open(tmp_path / "camera.jpg"))
    upright = np.rot90(load_image(tmp_path / "plain.jpg").rgb, -1)  # orientation 6: a quarter clockwise
    np.testing.assert_array_equal(load_image(tmp_path / "camera.jpg").rgb, upright)


DATA = Path(__file__).parent / "data"
P3_TO_SRGB = np.array([[1.2249, -0.2247, 0.0], [-0.0420, 1.0419, 0.0], [-0.0197, -0.0786, 1.0979]])


def _phone_pixels() -> np.ndarray:
    """What tests/data/phone-p3.heic stores (lossless, Display P3, EXIF orientation 6, Make TestCam)."""
    y, x = np.mgrid[0:40, 0:48]
    return np.stack([x * 5, 60 + y * 3, 255 - x * 5], axis=-1).astype(np.uint8)


def test_a_phones_heic_photo_loads_upright_with_its_camera_tags() -> None:
    loaded = load_image(DATA / "phone-p3.heic")
    assert loaded.rgb.shape == (48, 40, 3)  # stored 48 wide, shown turned a quarter clockwise
    exif = Image.Exif()
    exif.load(loaded.source_metadata.exif)
    assert exif[ExifTags.Base.Make] == "TestCam"


def test_a_heic_photo_in_display_p3_is_converted_to_srgb() -> None:
    stored = np.rot90(_phone_pixels(), -1) / 255.0
    linear = np.where(stored <= 0.04045, stored / 12.92, ((stored + 0.055) / 1.055) ** 2.4)
    expected = _srgb_encode(np.clip(linear @ P3_TO_SRGB.T, 0.0, 1.0))
    got = load_image(DATA / "phone-p3.heic").rgb
    np.testing.assert_allclose(got, expected, atol=2 / 255)
    assert np.abs(got - stored).max() > 10 / 255  # really converted, not passed through


def test_an_avif_tagged_display_p3_by_its_colour_description_is_converted_to_srgb() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (0, 200, 0)).save(buffer, format="AVIF", quality=100, subsampling="4:4:4")
    data = buffer.getvalue()
    primaries = data.index(b"colrnclx") + 8  # Pillow writes BT.709's code (1): Display P3's is 12
    p3 = data[:primaries] + struct.pack(">H", 12) + data[primaries + 2:]
    linear_green = 1.0419 * ((200 / 255 + 0.055) / 1.055) ** 2.4  # P3 green in sRGB, red and blue clipped
    np.testing.assert_allclose(load_image(p3).rgb[0, 0], [0.0, _srgb_encode(linear_green), 0.0], atol=2 / 255)
    np.testing.assert_allclose(load_image(data).rgb[0, 0], [0.0, 200 / 255, 0.0], atol=1 / 255)


def _ten_bit_pixels() -> np.ndarray:
    """What tests/data/ten-bit.heic and ten-bit.avif store (lossless, 10 bits, sRGB, to be turned a quarter
    clockwise: the HEIC's EXIF orientation 6, the AVIF's 'irot' property)."""
    y, x = np.mgrid[0:40, 0:48]
    red = x * 1023 // 47
    return np.stack([red, (y * 37 + x * 3) % 1024, 1023 - red], axis=-1)


def test_a_10_bit_heic_keeps_its_precision_and_loads_upright() -> None:
    loaded = load_image(DATA / "ten-bit.heic")
    np.testing.assert_allclose(loaded.rgb, np.rot90(_ten_bit_pixels(), -1) / 1023, atol=1 / 65535)
    assert loaded.source_metadata.bits == 16


def test_a_10_bit_avif_keeps_its_precision_and_loads_upright() -> None:
    loaded = load_image(DATA / "ten-bit.avif")
    np.testing.assert_allclose(loaded.rgb, np.rot90(_ten_bit_pixels(), -1) / 1023, atol=1 / 65535)
    assert loaded.source_metadata.bits == 16


def _levels(bits: int, channels: int = 3) -> np.ndarray:
    """32×32 samples of an AVIF's depth climbing one level a pixel, so that neighbours are a level apart."""
    ramp = np.arange(32 * 32 * channels).reshape(32, 32, channels) + 100
    return (ramp % (1 << bits)).astype(np.uint16)


@pytest.mark.parametrize("bits", [10, 12])
def test_a_deep_avif_keeps_every_level(bits: int) -> None:
    pixels = _levels(bits)
    loaded = load_image(imagecodecs.avif_encode(pixels, level=100, bitspersample=bits, pixelformat="444"))
    np.testing.assert_allclose(loaded.rgb, pixels / ((1 << bits) - 1), atol=1 / 65535)
    assert loaded.rgb[0, 1, 0] > loaded.rgb[0, 0, 0]  # neighbouring levels: one 8-bit value at 8 bits
    assert loaded.source_metadata.bits == 16


def test_a_10_bit_avifs_alpha_keeps_its_precision() -> None:
    pixels = _levels(10, channels=4)
    pixels[..., 3] = np.maximum(pixels[..., 3], 1)  # nothing fully transparent: the colour stays as it is
    loaded = load_image(imagecodecs.avif_encode(pixels, level=100, bitspersample=10, pixelformat="444"))
    np.testing.assert_allclose(loaded.alpha, pixels[..., 3] / 1023, atol=1 / 65535)
    np.testing.assert_allclose(loaded.rgb, pixels[..., :3] / 1023, atol=1 / 65535)


def test_a_10_bit_avif_tagged_display_p3_is_converted_to_srgb() -> None:
    pixels = np.zeros((32, 32, 3), np.uint16)
    pixels[..., 1] = 800
    data = imagecodecs.avif_encode(pixels, level=100, bitspersample=10, pixelformat="444", primaries=12,
                                   transfer=13)  # Display P3: its primaries, sRGB's tone curve
    linear_green = 1.0419 * ((800 / 1023 + 0.055) / 1.055) ** 2.4  # P3 green in sRGB, red and blue clipped
    np.testing.assert_allclose(load_image(data).rgb[0, 0], [0.0, _srgb_encode(linear_green), 0.0], atol=1e-3)


def test_a_10_bit_avif_without_imagecodecs_avif_is_read_at_8_bits_with_a_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def avif_missing(*args: object, **kwargs: object) -> None:  # as imagecodecs built without libavif
        raise imagecodecs.DelayedImportError("avif_decode")

    monkeypatch.setattr(imagecodecs, "avif_decode", avif_missing)
    with caplog.at_level(logging.WARNING, logger="stylekit.image"):
        loaded = load_image(DATA / "ten-bit.avif")
    assert [r.getMessage() for r in caplog.records] == [
        "image '" + str(DATA / "ten-bit.avif") + "' is read at 8 bits per channel, not 10 (that needs the "
        "imagecodecs package with AVIF)"
    ]
    np.testing.assert_allclose(loaded.rgb, np.rot90(_ten_bit_pixels(), -1) / 1023, atol=0.5 / 255 + 1e-6)


def _deep_rgb(height: int = 32, width: int = 48, channels: int = 3) -> np.ndarray:
    """Random 16-bit pixels, most of them between two 8-bit steps."""
    return np.random.default_rng(1).integers(0, 65536, (height, width, channels), dtype=np.uint16)


def _chunk(kind: bytes, body: bytes) -> bytes:
    """A PNG chunk: length, kind, body and checksum."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _scanlines(pixels: np.ndarray) -> bytes:
    """16-bit pixels as PNG scanlines, row i filtered with type i % 5 (none, sub, up, average, Paeth)."""
    rows = pixels.astype(">u2").reshape(pixels.shape[0], -1).view(np.uint8).astype(np.int32)
    step = pixels.shape[2] * 2  # a pixel's bytes: the filters' "left" is the byte a pixel back
    lines = []
    for i, row in enumerate(rows):
        up = rows[i - 1] if i else np.zeros_like(row)
        left, up_left = (np.concatenate([np.zeros(step, np.int32), r[:-step]]) for r in (row, up))
        guess = left + up - up_left
        near = [np.abs(guess - r) for r in (left, up, up_left)]
        paeth = np.where((near[0] <= near[1]) & (near[0] <= near[2]), left,
                         np.where(near[1] <= near[2], up, up_left))
        predicted = (0, left, up, (left + up) // 2, paeth)[i % 5]
        lines.append(bytes([i % 5]) + ((row - predicted) % 256).astype(np.uint8).tobytes())
    return b"".join(lines)


# Adam7 interlacing's seven passes: first column and row, then steps across and down
_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def _png16(pixels: np.ndarray, *, interlaced: bool = False, before: bytes = b"", after: bytes = b"") -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by channel count), written by hand: Pillow cannot;
    before and after are chunks to put before and after its pixel data."""
    height, width, channels = pixels.shape
    passes = _ADAM7 if interlaced else [(0, 0, 1, 1)]
    raw = b"".join(_scanlines(pixels[y::step_y, x::step_x]) for x, y, step_x, step_y in passes)
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, int(interlaced))
    pixel_data = _chunk(b"IDAT", zlib.compress(raw))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + before + pixel_data + after + _chunk(b"IEND", b"")


def _off_the_8_bit_grid(values: np.ndarray) -> bool:
    return bool(np.abs(values * 255 - np.rint(values * 255)).max() > 0.1)


@pytest.mark.parametrize("interlaced", [False, True])
def test_a_16_bit_png_keeps_its_precision(tmp_path: Path, interlaced: bool) -> None:
    pixels = _deep_rgb()
    (tmp_path / "deep.png").write_bytes(_png16(pixels, interlaced=interlaced))
    loaded = load_image(tmp_path / "deep.png")
    np.testing.assert_allclose(loaded.rgb, pixels / 65535.0, atol=1e-6)
    assert loaded.source_metadata.bits == 16


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_a_16_bit_tiff_keeps_its_precision(tmp_path: Path, planar: str) -> None:
    pixels = _deep_rgb()
    stored = pixels if planar == "contig" else np.moveaxis(pixels, -1, 0)
    tifffile.imwrite(tmp_path / "deep.tif", stored, photometric="rgb", planarconfig=planar)
    np.testing.assert_allclose(load_image(tmp_path / "deep.tif").rgb, pixels / 65535.0, atol=1e-6)


def _write_16_bit_with_alpha(path: Path, pixels: np.ndarray, photometric: str) -> Path:
    """A 16-bit image whose last channel is (unassociated) alpha, as a PNG or a TIFF by path's suffix."""
    if path.suffix == ".png":
        path.write_bytes(_png16(pixels))
    else:
        tifffile.imwrite(path, pixels, photometric=photometric, extrasamples=["unassalpha"])
    return path


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_16_bit_alpha_keeps_its_precision(tmp_path: Path, suffix: str) -> None:
    pixels = _deep_rgb(channels=4)
    pixels[..., 3] = np.maximum(pixels[..., 3], 1)  # nothing fully transparent: the colour stays as it is
    loaded = load_image(_write_16_bit_with_alpha(tmp_path / f"deep{suffix}", pixels, "rgb"))
    np.testing.assert_allclose(loaded.alpha, pixels[..., 3] / 65535.0, atol=1e-6)
    np.testing.assert_allclose(loaded.rgb, pixels[..., :3] / 65535.0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_16_bit_grey_image_with_alpha_loads_as_grey_rgb_and_alpha(tmp_path: Path, suffix: str) -> None:
    pixels = _deep_rgb(channels=2)
    pixels[..., 1] = np.maximum(pixels[..., 1], 1)  # nothing fully transparent: the grey stays as it is
    loaded = load_image(_write_16_bit_with_alpha(tmp_path / f"deep{suffix}", pixels, "minisblack"))
    np.testing.assert_allclose(loaded.rgb, np.repeat(pixels[..., :1] / 65535.0, 3, axis=2), atol=1e-6)
    np.testing.assert_allclose(loaded.alpha, pixels[..., 1] / 65535.0, atol=1e-6)
    assert loaded.source_metadata.bits == 16


def test_a_16_bit_photo_is_turned_upright(tmp_path: Path) -> None:
    pixels = _deep_rgb()
    tifffile.imwrite(tmp_path / "deep.tif", pixels, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    upright = np.rot90(pixels, -1) / 65535.0  # orientation 6: turned a quarter clockwise
    np.testing.assert_allclose(load_image(tmp_path / "deep.tif").rgb, upright, atol=1e-6)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_a_16_bit_photo_is_turned_as_the_same_8_bit_photo_is(tmp_path: Path, orientation: int) -> None:
    pixels = _random_rgb8(32, 48)
    tag = [(274, "H", 1, orientation, True)]
    tifffile.imwrite(tmp_path / "deep.tif", pixels.astype(np.uint16) * 257, photometric="rgb", extratags=tag)
    tifffile.imwrite(tmp_path / "flat.tif", pixels, photometric="rgb", extratags=tag)
    np.testing.assert_allclose(load_image(tmp_path / "deep.tif").rgb, load_image(tmp_path / "flat.tif").rgb,
                               atol=1e-6)


def test_a_16_bit_pngs_orientation_stored_after_its_pixel_data_turns_it_upright() -> None:
    pixels = _deep_rgb()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    loaded = load_image(_png16(pixels, after=_chunk(b"eXIf", exif.tobytes()[6:])))  # less "Exif\0\0"
    np.testing.assert_allclose(loaded.rgb, np.rot90(pixels, -1) / 65535.0, atol=1e-6)


def test_a_16_bit_png_transparent_colour_becomes_alpha() -> None:
    pixels = _deep_rgb()
    pixels[:, :8] = (1234, 40000, 65535)
    loaded = load_image(_png16(pixels, before=_chunk(b"tRNS", struct.pack(">3H", 1234, 40000, 65535))))
    assert loaded.alpha is not None
    assert np.all(loaded.alpha[:, :8] == 0.0)
    assert np.all(loaded.alpha[:, 8:] == 1.0)
    np.testing.assert_allclose(loaded.rgb[:, 8:], pixels[:, 8:] / 65535.0, atol=1e-6)


def test_a_16_bit_png_failing_its_checksum_loads_as_an_8_bit_one_does_not_crashing_the_process() -> None:
    pixels = _deep_rgb()
    data = bytearray(_png16(pixels))
    data[data.index(b"IEND") - 5] ^= 0xFF  # the pixel data's checksum, which libpng refuses by crashing
    np.testing.assert_allclose(load_image(bytes(data)).rgb, pixels / 65535.0, atol=1e-6)


def test_a_16_bit_lzw_tiff_keeps_its_precision(tmp_path: Path) -> None:
    pixels = _deep_rgb()
    tifffile.imwrite(tmp_path / "lzw.tif", pixels, photometric="rgb", compression="lzw")
    np.testing.assert_allclose(load_image(tmp_path / "lzw.tif").rgb, pixels / 65535.0, atol=1e-6)


def test_a_16_bit_tiff_whose_codec_is_missing_is_read_at_8_bits_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    pixels = _deep_rgb()
    path = tmp_path / "lzw.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", compression="lzw")
    monkeypatch.setattr(tifffile.TIFF, "DECOMPRESSORS", {1: None})  # as without imagecodecs: no LZW
    with caplog.at_level(logging.WARNING, logger="stylekit.image"):
        loaded = load_image(path)
    assert [r.getMessage() for r in caplog.records] == [
        f"image '{path}' is read at 8 bits per channel (its tiff_lzw compression needs the imagecodecs "
        "package for 16)"
    ]
    np.testing.assert_allclose(loaded.rgb, pixels / 65535.0, atol=1 / 255)
    assert loaded.source_metadata.bits == 16  # a PNG or TIFF output still has 16 bits


def test_a_damaged_compressed_16_bit_tiff_is_reported_as_such_naming_the_file(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, _deep_rgb(64, 64), photometric="rgb", compression="zlib")
    (tmp_path / "damaged.tif").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"^image '.*damaged\.tif' is truncated or corrupt \(.*\)$"):
        load_image(tmp_path / "damaged.tif")


@pytest.mark.parametrize(("kind", "keep"), [("uncompressed float", 0.5), ("uncompressed 16-bit", 0.5),
                                            ("header only", 0.1)])
def test_a_cut_tiff_is_reported_naming_the_file_and_nothing_else_is_printed(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], kind: str, keep: float) -> None:
    buffer = io.BytesIO()
    pixels = _deep_rgb(64, 64) if "16" in kind else _deep_rgb(64, 64).astype(np.float32) / 65535
    tifffile.imwrite(buffer, pixels, photometric="rgb")
    (tmp_path / "cut.tif").write_bytes(buffer.getvalue()[:int(len(buffer.getvalue()) * keep)])
    with pytest.raises(ImageError, match=r"^image '.*cut\.tif' is truncated or corrupt \(.*\)$"):
        load_image(tmp_path / "cut.tif")
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("curve", [b"para" + bytes(4) + struct.pack(">HH", 1, 0) + _s15(2.2) + bytes(8),
                                   b"para" + bytes(4) + struct.pack(">HH", 0, 0) + _s15(-1.0)],
                         ids=["slope-0", "gamma-minus-1"])
def test_a_16_bit_photo_with_a_broken_tone_curve_loads_as_the_8_bit_one_does(
    tmp_path: Path, curve: bytes
) -> None:
    tags = [(sig, _xyz_tag(c)) for sig, c in zip((b"rXYZ", b"gXYZ", b"bXYZ"), SRGB_COLORANTS, strict=True)]
    icc_profile = _display_profile(b"RGB ", [*tags, *((sig, curve) for sig in (b"rTRC", b"gTRC", b"bTRC"))])
    pixels = _deep_rgb()
    tifffile.imwrite(tmp_path / "deep.tif", pixels, photometric="rgb", iccprofile=icc_profile)
    eight = Image.fromarray(np.rint(pixels / 257).astype(np.uint8))
    eight.save(tmp_path / "eight.tif", icc_profile=icc_profile)
    deep = load_image(tmp_path / "deep.tif").rgb  # through LittleCMS, as the 8-bit one, not in NaNs
    np.testing.assert_allclose(deep, load_image(tmp_path / "eight.tif").rgb, atol=1.5 / 255)


def test_a_16_bit_png_output_is_read_alike_by_libpng(tmp_path: Path) -> None:
    pixels = _deep_rgb(channels=4)
    rgb, alpha = pixels[..., :3] / 65535.0, pixels[..., 3] / 65535.0
    save_image(tmp_path / "deep.png", rgb.astype(np.float32), alpha.astype(np.float32),
               source_metadata=image.SourceMetadata(bits=16))
    np.testing.assert_array_equal(imagecodecs.png_decode((tmp_path / "deep.png").read_bytes()), pixels)


def test_a_16_bit_tiff_that_pillow_lays_out_otherwise_is_written_with_8_bits_and_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def other_layout(tiff: bytes, pixels: np.ndarray) -> bytes:
        raise ValueError("not laid out as one strip at the end")  # what _deep_tiff says of a new layout

    monkeypatch.setattr(image, "_deep_tiff", other_layout)
    with caplog.at_level(logging.WARNING, logger="stylekit.image"):
        save_image(tmp_path / "out.tif", _gradient(), source_metadata=image.SourceMetadata(bits=16))
    assert "is written with 8 bits per channel, not 16" in caplog.text
    np.testing.assert_allclose(load_image(tmp_path / "out.tif").rgb, _gradient(), atol=0.5 / 255)


def test_hidden_colour_filled_a_band_of_rows_at_a_time_is_filled_as_it_would_be_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(2)
    rgb, alpha = rng.random((40, 48, 3), dtype=np.float32), (rng.random((40, 48)) > 0.7).astype(np.float32)
    whole = rgb.copy()
    image._fill_hidden(whole, alpha)
    monkeypatch.setattr(image, "_BAND", 4)  # rows at a time
    banded = rgb.copy()
    image._fill_hidden(banded, alpha)
    np.testing.assert_array_equal(banded, whole)


def test_a_16_bit_pngs_exif_kept_as_imagemagick_does_turns_it_upright_and_is_carried(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Orientation] = "Canon", 6
    data = exif.tobytes()
    text = f"\nexif\n{len(data):8d}\n{data.hex()}\n".encode()  # the "Raw profile type exif" form
    raw_profile = b"Raw profile type exif\0\0" + zlib.compress(text)
    png = _png16(_deep_rgb())
    start = png.index(b"IDAT") - 4
    chunk = struct.pack(">I", len(raw_profile)) + b"zTXt" + raw_profile
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + raw_profile))
    (tmp_path / "deep.png").write_bytes(png[:start] + chunk + png[start:])
    loaded = load_image(tmp_path / "deep.png")
    assert loaded.rgb.shape == (48, 32, 3)  # stored 48 wide: turned a quarter
    kept = Image.Exif()
    kept.load(loaded.source_metadata.exif)
    assert kept[ExifTags.Base.Make] == "Canon"


@pytest.mark.parametrize("note", ['{"shape": [72, 96, 3]}', "ImageJ=1.11a\nimages=1\n"])
def test_a_tiff_writers_note_in_the_description_is_not_carried_to_the_output(
    tmp_path: Path, note: str
) -> None:
    tifffile.imwrite(tmp_path / "scan.tif", _deep_rgb(), photometric="rgb", description=note, metadata=None)
    kept = Image.Exif()
    kept.load(load_image(tmp_path / "scan.tif").source_metadata.exif)
    assert ExifTags.Base.ImageDescription not in kept


def test_a_16_bit_tiffs_premultiplied_colour_is_divided_by_its_alpha(tmp_path: Path) -> None:
    straight = _deep_rgb(channels=4)
    straight[..., 3] = np.maximum(straight[..., 3], 4096)  # (dividing by a tiny alpha magnifies rounding)
    stored = straight.copy()
    stored[..., :3] = np.rint(straight[..., :3] * (straight[..., 3:] / 65535.0))
    tifffile.imwrite(tmp_path / "premultiplied.tif", stored, photometric="rgb", extrasamples=["assocalpha"])
    loaded = load_image(tmp_path / "premultiplied.tif")
    np.testing.assert_allclose(loaded.rgb, straight[..., :3] / 65535.0, atol=2e-4)
    np.testing.assert_allclose(loaded.alpha, straight[..., 3] / 65535.0, atol=1e-6)


def test_a_16_bit_tiffs_unspecified_extra_sample_is_not_taken_for_alpha(tmp_path: Path) -> None:
    pixels = _deep_rgb(channels=4)
    tifffile.imwrite(tmp_path / "extra.tif", pixels, photometric="rgb", extrasamples=["unspecified"])
    loaded = load_image(tmp_path / "extra.tif")
    assert loaded.alpha is None
    np.testing.assert_allclose(loaded.rgb, pixels[..., :3] / 65535.0, atol=1e-6)


def test_a_16_bit_grey_tiff_whose_zero_is_white_is_not_read_as_a_negative(tmp_path: Path) -> None:
    grey = _deep_rgb(channels=1)[..., 0]
    tifffile.imwrite(tmp_path / "grey.tif", grey, photometric="miniswhite")
    np.testing.assert_allclose(load_image(tmp_path / "grey.tif").rgb[..., 0], 1.0 - grey / 65535.0, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_a_floating_point_tiff_is_read_as_its_values(tmp_path: Path, dtype: type, channels: int) -> None:
    values = np.random.default_rng(2).random((32, 48, channels)).astype(dtype)
    values[..., 3:] = np.maximum(values[..., 3:], 0.01)  # nothing fully transparent
    photometric, extra = ("minisblack", None) if channels == 1 else ("rgb", ["unassalpha"][:channels - 3])
    tifffile.imwrite(tmp_path / "float.tif", values, photometric=photometric, extrasamples=extra)
    loaded = load_image(tmp_path / "float.tif")
    np.testing.assert_allclose(loaded.rgb, np.broadcast_to(values[..., :3], (32, 48, 3)), atol=1e-7)
    if channels == 4:
        np.testing.assert_allclose(loaded.alpha, values[..., 3], atol=1e-7)
    assert loaded.source_metadata.bits == 16  # a PNG or TIFF output has 16 bits


def test_a_floating_point_tiffs_values_outside_0_to_1_are_clipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    values = np.full((32, 32, 3), 0.25, np.float32)
    values[0, 0] = (4.0, -0.5, 1.0)  # an HDR render's highlight, and a negative
    tifffile.imwrite(tmp_path / "hdr.tif", values, photometric="rgb")
    with caplog.at_level(logging.WARNING, logger="stylekit.image"):
        loaded = load_image(tmp_path / "hdr.tif")
    assert [r.getMessage() for r in caplog.records] == [
        f"image '{tmp_path / 'hdr.tif'}' has values from -0.5 to 4: those outside 0–1 are clipped (HDR "
        "highlights lose their detail)"
    ]
    np.testing.assert_array_equal(loaded.rgb[0, 0], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(loaded.rgb[1:], 0.25)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_floating_point_tiff_with_nan_or_infinity_is_refused_on_one_line(
    tmp_path: Path, bad: float
) -> None:
    values = np.full((32, 32), 0.5, np.float32)
    values[3, 4] = bad
    path = tmp_path / "broken.tif"
    tifffile.imwrite(path, values, photometric="minisblack")
    message = _assert_image_error(path, f"image '{path}' has NaN or infinite sample values")
    assert message == f"image '{path}' has NaN or infinite sample values, which have no colour"


def test_a_floating_point_grey_tiff_whose_zero_is_white_is_read_as_grey(tmp_path: Path) -> None:
    grey = np.random.default_rng(3).random((32, 48)).astype(np.float16)
    tifffile.imwrite(tmp_path / "grey.tif", grey, photometric="miniswhite")
    np.testing.assert_allclose(load_image(tmp_path / "grey.tif").rgb[..., 0], 1.0 - grey.astype(np.float32),
                               atol=1e-7)


def test_a_floating_point_tiff_whose_codec_is_missing_is_refused_on_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "lzw.tif"
    tifffile.imwrite(path, np.full((32, 32, 3), 0.5, np.float32), photometric="rgb", compression="lzw")
    monkeypatch.setattr(tifffile.TIFF, "DECOMPRESSORS", {1: None})  # as without imagecodecs: no LZW
    message = _assert_image_error(path, f"cannot read image '{path}'")
    assert message == f"cannot read image '{path}': its LZW compression needs the imagecodecs package"


def test_a_multi_page_floating_point_tiff_uses_its_first_page_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as tiff:
        for value in (0.25, 0.5):
            tiff.write(np.full((32, 32), value, np.float32), photometric="minisblack")
    with caplog.at_level(logging.WARNING, logger="stylekit.image"):
        rgb = load_image(path).rgb
    assert [r.getMessage() for r in caplog.records] == [f"image '{path}' has 2 pages: only the first is used"]
    np.testing.assert_array_equal(rgb, 0.25)


def test_a_floating_point_tiff_is_turned_upright_and_keeps_its_camera_tags_and_resolution(
    tmp_path: Path
) -> None:
    values = np.random.default_rng(4).random((32, 48, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "render.tif", values, photometric="rgb", resolution=(300, 300),
                     resolutionunit="inch", extratags=[(271, "s", 0, "Canon", True), (274, "H", 1, 6, True)])
    loaded = load_image(tmp_path / "render.tif")
    np.testing.assert_allclose(loaded.rgb, np.rot90(values, -1), atol=1e-7)
    exif = Image.Exif()
    exif.load(loaded.source_metadata.exif)
    assert exif[ExifTags.Base.Make] == "Canon"
    assert ExifTags.Base.ImageDescription not in exif  # tifffile's note of the array's shape
    assert loaded.source_metadata.dpi == pytest.approx((300, 300))


def test_a_large_16_bit_cut_out_with_a_profile_loads_in_little_more_memory_than_its_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(icc, "_BLOCK", 4096)  # pixels converted at a time, and rows filled at a time:
    monkeypatch.setattr(image, "_BAND", 16)  # small, as the picture is
    pixels = _deep_rgb(512, 512, channels=4)
    pixels[..., 3] = 65535
    pixels[:, 256:, 3] = 0  # a transparent half, filled from the visible one
    path = tmp_path / "large.tif"
    profile = _matrix_trc_profile(ADOBE_COLORANTS, ADOBE_GAMMA)
    tifffile.imwrite(path, pixels, photometric="rgb", extrasamples=["unassalpha"], iccprofile=profile)
    load_image(path)  # once before measuring: what loading imports the first time is not counted
    tracemalloc.start()
    try:
        loaded = load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert loaded.alpha is not None
    assert peak < 3 * (loaded.rgb.nbytes + loaded.alpha.nbytes)  # 5.4 times when it made whole copies


def test_a_16_bit_adobe_rgb_photo_is_converted_to_srgb_at_full_precision(tmp_path: Path) -> None:
    pixels = _deep_rgb()
    icc = _matrix_trc_profile(ADOBE_COLORANTS, ADOBE_GAMMA)
    tifffile.imwrite(tmp_path / "adobe.tif", pixels, photometric="rgb", iccprofile=icc)
    linear = (pixels / 65535.0) ** ADOBE_GAMMA @ np.linalg.solve(
        np.array(SRGB_COLORANTS).T, np.array(ADOBE_COLORANTS).T).T
    got = load_image(tmp_path / "adobe.tif").rgb
    # Within half an 8-bit step (this test's sRGB colorants and the profile's differ by up to 2e-4, which
    # sRGB's steep start magnifies in dark, saturated colours), and between the steps:
    np.testing.assert_allclose(got, _srgb_encode(np.clip(linear, 0.0, 1.0)), atol=0.5 / 255)
    assert _off_the_8_bit_grid(got)


def test_a_broken_profile_on_a_16_bit_photo_keeps_its_precision(tmp_path: Path) -> None:
    pixels = _deep_rgb()
    tifffile.imwrite(tmp_path / "deep.tif", pixels, photometric="rgb", iccprofile=b"not a profile" * 20)
    np.testing.assert_allclose(load_image(tmp_path / "deep.tif").rgb, pixels / 65535.0, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_16_bit_or_floating_point_input_gives_a_16_bit_png_or_tiff(
    tmp_path: Path, suffix: str, dtype: type
) -> None:
    source = tmp_path / "deep.tif"
    pixels = _deep_rgb(channels=4)
    stored = pixels if dtype is np.uint16 else (pixels / 65535.0).astype(dtype)
    tifffile.imwrite(source, stored, photometric="rgb", extrasamples=["unassalpha"])
    loaded = load_image(source)
    path = tmp_path / f"styled{suffix}"
    save_image(path, loaded.rgb, loaded.alpha, metadata=METADATA, source_metadata=loaded.source_metadata)
    back = load_image(path)
    assert _off_the_8_bit_grid(back.rgb) and _off_the_8_bit_grid(back.alpha)
    np.testing.assert_allclose(back.rgb, loaded.rgb, atol=1e-5)
    np.testing.assert_allclose(back.alpha, loaded.alpha, atol=1e-5)
    assert read_metadata(path) == METADATA
    with Image.open(path) as im:
        assert "icc_profile" in im.info


def test_a_16_bit_input_gives_an_8_bit_jpeg(tmp_path: Path) -> None:
    source = tmp_path / "deep.tif"
    tifffile.imwrite(source, _deep_rgb(), photometric="rgb")
    loaded = load_image(source)
    save_image(tmp_path / "styled.jpg", loaded.rgb, source_metadata=loaded.source_metadata)
    with Image.open(tmp_path / "styled.jpg") as im:
        assert (im.format, im.mode) == ("JPEG", "RGB")


def test_an_8_bit_input_gives_an_8_bit_png(tmp_path: Path) -> None:
    Image.fromarray(_random_rgb8()).save(tmp_path / "photo.png")
    loaded = load_image(tmp_path / "photo.png")
    save_image(tmp_path / "styled.png", loaded.rgb, source_metadata=loaded.source_metadata)
    assert (tmp_path / "styled.png").read_bytes()[24] == 8  # IHDR's bit depth


def test_embedded_srgb_profile_leaves_values_unchanged(tmp_path: Path) -> None:
    pixels = _random_rgb8()
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = tmp_path / "tagged.png"
    Image.fromarray(pixels).save(path, icc_profile=srgb)
    np.testing.assert_allclose(load_image(path).rgb, pixels / 255.0, atol=1.5 / 255)


def test_embedded_adobe_rgb_profile_is_converted_to_srgb(tmp_path: Path) -> None:
    source = np.array([180, 120, 90])
    path = tmp_path / "adobe.png"
    icc = _matrix_trc_profile(ADOBE_COLORANTS, ADOBE_GAMMA)
    Image.new("RGB", (32, 32), tuple(int(v) for v in source)).save(path, icc_profile=icc)
    # reference: Adobe RGB -> XYZ(D50) -> linear sRGB -> sRGB transfer curve
    linear = np.linalg.solve(
        np.array(SRGB_COLORANTS).T, np.array(ADOBE_COLORANTS).T @ (source / 255.0) ** ADOBE_GAMMA
    )
    expected = _srgb_encode(linear)
    got = load_image(path).rgb[0, 0]
    np.testing.assert_allclose(got, expected, atol=1.5 / 255)
    assert abs(got[0] - source[0] / 255.0) > 10 / 255  # really converted, not passed through


@pytest.mark.parametrize(("mode", "suffix", "white"), [("I;16", ".png", 65535), ("F", ".tif", 1.0)])
def test_a_grey_profile_on_deep_grey_is_applied_at_full_precision(
    tmp_path: Path, mode: str, suffix: str, white: float
) -> None:
    linear_grey = _display_profile(b"GRAY", [(b"kTRC", _gamma_curve(1.0))])
    levels = np.array([64 * 257, 64 * 257 + 1, 4, 60000]) / 65535
    values = np.repeat(levels, 8).reshape(4, 8) * white
    path = tmp_path / f"deep{suffix}"
    pixels = values.astype(np.uint16 if mode == "I;16" else np.float32)
    Image.fromarray(pixels).save(path, icc_profile=linear_grey)
    rgb = load_image(path).rgb
    np.testing.assert_allclose(rgb[:, 0, 0], _srgb_encode(levels), atol=2e-5)  # 64/255 → 137/255
    assert rgb[1, 0, 0] > rgb[0, 0, 0]  # neighbouring 16-bit values stay distinct
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_broken_icc_profile_falls_back_to_plain_values(tmp_path: Path) -> None:
    pixels = _random_rgb8()
    path = tmp_path / "broken_icc.png"
    Image.fromarray(pixels).save(path, icc_profile=b"definitely not a profile")
    np.testing.assert_allclose(load_image(path).rgb, pixels / 255.0, atol=1e-6)


def _cutout(hidden: tuple[int, int, int]) -> np.ndarray:
    """RGBA: visible random colours on the left (opaque, then partly transparent), a fully
    transparent right half holding the colour `hidden`."""
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :16, :3] = _random_rgb8(32, 16)
    rgba[:, :8, 3] = 255
    rgba[:, 8:16, 3] = np.arange(1, 33, dtype=np.uint8)[:, None] * 7
    rgba[:, 16:, :3] = hidden
    return rgba


def test_colour_under_fully_transparent_pixels_does_not_change_the_loaded_image(tmp_path: Path) -> None:
    Image.fromarray(_cutout((255, 0, 255))).save(tmp_path / "magenta.png")
    Image.fromarray(_cutout((0, 0, 0))).save(tmp_path / "black.png")
    np.testing.assert_array_equal(load_image(tmp_path / "magenta.png").rgb,
                                  load_image(tmp_path / "black.png").rgb)


def test_visible_pixels_keep_their_colour_however_transparent(tmp_path: Path) -> None:
    rgba = _cutout((255, 0, 255))
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba).save(path)
    np.testing.assert_allclose(load_image(path).rgb[:, :16], rgba[:, :16, :3] / 255.0, atol=1e-6)


def test_fully_transparent_pixels_take_their_visible_neighbours_colour(tmp_path: Path) -> None:
    rgba = np.zeros((32, 48, 4), dtype=np.uint8)
    rgba[:, :, :3] = (255, 0, 255)
    rgba[:, :24] = (0, 128, 255, 255)
    path = tmp_path / "half.png"
    Image.fromarray(rgba).save(path)
    np.testing.assert_allclose(load_image(path).rgb, np.broadcast_to([0, 128 / 255, 1], (32, 48, 3)),
                               atol=1e-6)


def test_a_fully_transparent_image_loads_as_grey(tmp_path: Path) -> None:
    path = tmp_path / "invisible.png"
    Image.new("RGBA", (32, 32), (255, 0, 255, 0)).save(path)
    loaded = load_image(path)
    np.testing.assert_array_equal(loaded.rgb, 0.5)
    assert loaded.alpha is not None and not loaded.alpha.any()


@pytest.mark.parametrize(("suffix", "kind"), [(".gif", "frames"), (".tif", "pages")])
def test_an_animation_or_multi_page_file_warns_that_only_its_first_frame_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, suffix: str, kind: str
) -> None:
    path = tmp_path / f"several{suffix}"
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, logger="stylekit.image"):
        rgb = load_image(path).rgb
    assert [r.getMessage() for r in caplog.records] == [
        f"image '{path}' has 3 {kind}: only the first is used"
    ]
    np.testing.assert_allclose(rgb[0, 0], [1.0, 0.0, 0.0], atol=0.01)


def test_a_loads_warnings_come_with_its_image_and_only_its_own(tmp_path: Path) -> None:
    path = tmp_path / "several.gif"
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green")]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # as a server loads uploads
        several, still = pool.map(load_image, [path, _png_bytes(Image.new("RGB", (32, 32)))])
    assert several.warnings == (f"image '{path}' has 2 frames: only the first is used",)
    assert still.warnings == ()


def test_a_heic_holding_several_images_uses_its_primary_one_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = DATA / "three-images-primary-second.heic"  # red, green (the primary one), blue
    with caplog.at_level(logging.WARNING, logger="stylekit.image"):
        rgb = load_image(path).rgb
    assert [r.getMessage() for r in caplog.records] == [
        f"image '{path}' has 3 images: only its primary one is used"
    ]
    np.testing.assert_allclose(rgb[16, 16], [0.0, 1.0, 0.0], atol=0.02)


@pytest.mark.parametrize(("suffix", "kept"), [(".gif", 0.7), (".tif", 0.5)])
def test_a_damaged_later_frame_leaves_the_first_loadable(tmp_path: Path, suffix: str, kept: float) -> None:
    path = tmp_path / f"several{suffix}"
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    first = load_image(path).rgb
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * kept)])  # cut inside a later frame
    np.testing.assert_array_equal(load_image(path).rgb, first)


def test_a_single_frame_gives_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "still.gif"
    Image.new("RGB", (32, 32), "red").save(path)
    with caplog.at_level(logging.WARNING, logger="stylekit.image"):
        load_image(path)
    assert caplog.records == []


def test_load_from_bytes_uses_placeholder_name() -> None:
    loaded = load_image(_png_bytes(Image.new("RGB", (32, 32), (0, 0, 255))))
    assert loaded.name == "<bytes>"
    np.testing.assert_allclose(loaded.rgb[0, 0], [0.0, 0.0, 1.0])


def test_load_from_bytes_uses_given_name() -> None:
    loaded = load_image(_png_bytes(Image.new("RGB", (32, 32))), name="upload.png")
    assert loaded.name == "upload.png"


# --- loading failures ---------------------------------------------------------------------


def _assert_image_error(source: object, expected: str, **kwargs: object) -> str:
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    return message


def test_image_error_is_a_stylekit_error() -> None:
    assert issubclass(ImageError, StylekitError)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    message = _assert_image_error(tmp_path / "nope.png", "nope.png")
    assert "not found" in message


def test_directory_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    message = _assert_image_error(folder, "folder.png")
    assert message.endswith("folder.png' is a folder, not a file")


def test_empty_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    message = _assert_image_error(path, "empty.png")
    assert message.endswith("empty.png' is empty (0 bytes)")


def test_text_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    message = _assert_image_error(path, "notes.jpg")
    assert "not an image" in message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_reported(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_random_rgb8(64, 64)).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _assert_image_error(path, path.name)


@pytest.mark.parametrize("kept", [100, -100])  # cut inside its structure, or inside its pixel data
@pytest.mark.parametrize("name", ["three-images-primary-second.heic", "ten-bit.heic"])
def test_a_truncated_heic_is_reported_as_such_on_one_line(name: str, kept: int) -> None:
    data = (DATA / name).read_bytes()[:kept]
    message = _assert_image_error(data, "cut.heic", name="cut.heic")
    assert message.startswith("image 'cut.heic' is truncated or corrupt")


def test_pixel_limit_is_enforced_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (32, 32)).save(path)
    message = _assert_image_error(path, "big.png", max_pixels=100)
    assert "1,024" in message


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims a size its few bytes never hold: a decompression bomb's shape."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IEND", b""))
    return path


def test_an_image_past_pillows_own_guard_gets_stylekits_message_and_limit(tmp_path: Path) -> None:
    path = _png_claiming(tmp_path / "bomb.png", 20_000, 20_000)  # over twice Pillow's default limit
    message = _assert_image_error(path, "bomb.png")
    assert message == f"image '{path}' is 400,000,000 pixels, over the limit of 50,000,000"


def test_pillows_warning_limit_leaves_the_decision_to_stylekits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "small.png"
    Image.new("RGB", (32, 32)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # Pillow warns over 600, refuses over 1,200
    assert load_image(path).rgb.shape == (32, 32, 3)


def test_a_lower_pillow_limit_set_in_the_process_is_the_one_quoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (32, 32)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses over 200 before stylekit looks
    message = _assert_image_error(path, "bomb.png")
    assert message.endswith("is 1,024 pixels, over the limit of 200")


def test_bad_bytes_are_reported_with_name() -> None:
    _assert_image_error(b"", "<bytes>")
    _assert_image_error(b"GIF89a garbage", "upload.gif", name="upload.gif")


def test_bytes_obey_pixel_limit() -> None:
    _assert_image_error(_png_bytes(Image.new("RGB", (32, 32))), "<bytes>", max_pixels=100)


# --- output format ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.png", "PNG"),
        ("a.jpg", "JPEG"),
        ("a.JPEG", "JPEG"),
        ("a.webp", "WEBP"),
        ("a.avif", "AVIF"),
        ("a.tif", "TIFF"),
        ("a.tiff", "TIFF"),
    ],
)
def test_output_format_follows_extension(name: str, fmt: str) -> None:
    assert output_format(name) == fmt


def test_unsupported_output_extension_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"unsupported output extension '\.bmp'"):
        save_image(tmp_path / "out.bmp", _gradient())
    assert list(tmp_path.iterdir()) == []


def test_missing_output_extension_is_refused() -> None:
    with pytest.raises(ImageError, match="no extension"):
        output_format("result")


# --- saving -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "tolerance"),
    [(".png", 0.5 / 255), (".tif", 0.5 / 255), (".jpg", 0.03), (".webp", 0.03), (".avif", 0.03)],
)
def test_save_load_round_trip(tmp_path: Path, suffix: str, tolerance: float) -> None:
    rgb = _gradient()
    path = tmp_path / f"out{suffix}"
    save_image(path, rgb)
    loaded = load_image(path)
    assert loaded.rgb.shape == rgb.shape
    assert np.abs(loaded.rgb - rgb).mean() <= tolerance


def test_save_rounds_and_clips(tmp_path: Path) -> None:
    rgb = np.zeros((32, 32, 3), dtype=np.float32)
    rgb[..., 0] = 1.7
    rgb[..., 1] = -0.3
    rgb[..., 2] = 100.6 / 255
    path = tmp_path / "clip.png"
    save_image(path, rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(path))[0, 0], [255, 0, 101])


@pytest.mark.parametrize("suffix", [".png", ".webp", ".avif", ".tif"])
def test_alpha_survives_round_trip(tmp_path: Path, suffix: str) -> None:
    alpha = np.tile(np.linspace(0, 1, 48, dtype=np.float32), (32, 1))
    path = tmp_path / f"cutout{suffix}"
    save_image(path, _gradient(), alpha)
    loaded = load_image(path)
    assert loaded.alpha is not None
    np.testing.assert_allclose(loaded.alpha, alpha, atol=0.5 / 255)


def test_jpeg_flattens_alpha_onto_white(tmp_path: Path) -> None:
    alpha = np.zeros((32, 48), dtype=np.float32)
    alpha[:, 16:32] = 0.5
    alpha[:, 32:] = 1.0
    path = tmp_path / "flat.jpg"
    save_image(path, np.zeros((32, 48, 3), dtype=np.float32), alpha)
    loaded = load_image(path)
    assert loaded.alpha is None
    for column, expected in ((4, 1.0), (24, 0.5), (44, 0.0)):
        np.testing.assert_allclose(loaded.rgb[16, column], expected, atol=3 / 255)


def test_jpeg_keeps_fine_colour_detail(tmp_path: Path) -> None:
    rgb = np.zeros((32, 48, 3), dtype=np.float32)
    rgb[:, 0::2, 0] = 1.0  # one-pixel red and blue stripes: 4:2:0 subsampling would blend them purple
    rgb[:, 1::2, 2] = 1.0
    path = tmp_path / "stripes.jpg"
    save_image(path, rgb)
    assert np.abs(load_image(path).rgb - rgb).mean() < 0.03


def test_alpha_of_different_size_is_resized(tmp_path: Path) -> None:
    path = tmp_path / "resized.png"
    save_image(path, _gradient(32, 48), np.full((8, 12), 0.5, dtype=np.float32))
    loaded = load_image(path)
    assert loaded.alpha is not None
    assert loaded.alpha.shape == (32, 48)
    np.testing.assert_allclose(loaded.alpha, 128 / 255, atol=1e-6)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".avif", ".tif"])
def test_metadata_round_trips(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"meta{suffix}"
    save_image(path, _gradient(), metadata=METADATA)
    assert read_metadata(path) == METADATA
    assert read_metadata(path.read_bytes()) == METADATA


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".avif", ".tif"])
def test_software_tag_is_stylekit(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"soft{suffix}"
    save_image(path, _gradient())
    with Image.open(path) as im:
        software = im.info.get("Software") or im.getexif().get(0x0131)
    assert software == "stylekit"


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".avif", ".tif"])
def test_run_metadata_is_not_shown_as_a_caption(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"meta{suffix}"
    save_image(path, _gradient(), metadata=METADATA)
    with Image.open(path) as im:
        assert ExifTags.Base.ImageDescription not in im.getexif()


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".avif", ".tif"])
def test_every_output_embeds_an_srgb_profile(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"tagged{suffix}"
    save_image(path, _gradient())
    with Image.open(path) as im:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
    assert "sRGB" in ImageCms.getProfileDescription(profile)


def test_encoded_png_embeds_an_srgb_profile() -> None:
    with Image.open(io.BytesIO(encode_png(_gradient()))) as im:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
    assert "sRGB" in ImageCms.getProfileDescription(profile)


@pytest.mark.parametrize("source_suffix", [".jpg", ".png", ".webp", ".avif", ".tif"])
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".avif", ".tif"])
def test_camera_metadata_is_carried_to_the_output(tmp_path: Path, source_suffix: str, suffix: str) -> None:
    source = tmp_path / f"camera{source_suffix}"
    Image.fromarray(_random_rgb8()).save(source, exif=_camera_exif().tobytes())
    path = tmp_path / f"styled{suffix}"
    save_image(path, _gradient(), metadata=METADATA, source_metadata=load_image(source).source_metadata)
    base = ExifTags.Base
    with Image.open(path) as im:
        exif = im.getexif()
        details, gps = exif.get_ifd(ExifTags.IFD.Exif), exif.get_ifd(ExifTags.IFD.GPSInfo)
    camera = {base.Make: "Canon", base.Model: "EOS R5", base.DateTime: "2024:05:06 07:08:09",
              base.Artist: "Ada", base.Copyright: "(c) Ada", base.Software: "stylekit"}
    assert {tag: exif.get(tag) for tag in camera} == camera
    assert details[base.DateTimeOriginal] == "2024:05:06 07:08:09"
    assert gps[ExifTags.GPS.GPSLatitudeRef] == "N"
    assert read_metadata(path) == METADATA


def test_camera_metadata_too_large_for_a_jpeg_is_left_out_not_the_picture(tmp_path: Path) -> None:
    exif = _camera_exif()
    exif[ExifTags.Base.XPComment] = "long story ".encode("utf-16-le") * 4000  # 88 kB; a JPEG holds 64
    source = tmp_path / "annotated.png"
    Image.fromarray(_random_rgb8()).save(source, exif=exif.tobytes())
    path = tmp_path / "styled.jpg"
    save_image(path, _gradient(), metadata=METADATA, source_metadata=load_image(source).source_metadata)
    with Image.open(path) as im:
        assert ExifTags.Base.Make not in im.getexif()
    assert read_metadata(path) == METADATA


def test_orientation_thumbnail_and_maker_note_stay_behind(tmp_path: Path) -> None:
    source = tmp_path / "camera.jpg"
    exif = Image.Exif()
    exif.load(_exif_with_thumbnail(_jpeg_bytes(Image.new("RGB", (8, 8), "red"))))
    assert exif[ExifTags.Base.Orientation] == 6 and exif.get_ifd(ExifTags.IFD.IFD1)  # the input has them
    exif[ExifTags.IFD.Exif] = {ExifTags.Base.MakerNote: b"maker's own bytes"}
    Image.fromarray(_random_rgb8()).save(source, exif=exif.tobytes())
    path = tmp_path / "styled.jpg"
    save_image(path, _gradient(), source_metadata=load_image(source).source_metadata)
    with Image.open(path) as im:
        kept = im.getexif()
    assert ExifTags.Base.Orientation not in kept
    assert not kept.get_ifd(ExifTags.IFD.IFD1)
    assert ExifTags.Base.MakerNote not in kept.get_ifd(ExifTags.IFD.Exif)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".avif", ".tif"])
def test_print_resolution_is_carried_to_the_output(tmp_path: Path, suffix: str) -> None:
    source = tmp_path / "scan.png"
    Image.fromarray(_random_rgb8()).save(source, dpi=(300, 300))
    path = tmp_path / f"styled{suffix}"
    save_image(path, _gradient(), source_metadata=load_image(source).source_metadata)
    with Image.open(path) as im:  # WebP and AVIF have no resolution of their own, only EXIF's
        exif = im.getexif()
        dpi = (exif[ExifTags.Base.XResolution],) * 2 if suffix in (".webp", ".avif") else im.info["dpi"]
    assert dpi == pytest.approx((300, 300), abs=0.01)


def test_read_metadata_without_metadata_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    Image.new("RGB", (32, 32)).save(path)
    assert read_metadata(path) == {}


def test_read_metadata_ignores_foreign_description(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x010E] = "OLYMPUS DIGITAL CAMERA"
    path = tmp_path / "camera.jpg"
    Image.new("RGB", (32, 32)).save(path, exif=exif.tobytes())
    assert read_metadata(path) == {}


def test_read_metadata_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"gone\.png"):
        read_metadata(tmp_path / "gone.png")


def test_save_leaves_only_the_target(tmp_path: Path) -> None:
    path = tmp_path / "only.png"
    save_image(path, _gradient())
    assert list(tmp_path.iterdir()) == [path]


def test_a_name_of_250_bytes_in_four_byte_characters_can_be_saved(tmp_path: Path) -> None:
    path = tmp_path / ("\N{GRINNING FACE}" * 61 + ".png")  # 248 bytes: its temporary name must fit too
    save_image(path, _gradient())
    assert list(tmp_path.iterdir()) == [path] and load_image(path).rgb.shape == _gradient().shape


def test_missing_parent_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        save_image(tmp_path / "no" / "such" / "out.png", _gradient())
    assert list(tmp_path.iterdir()) == []


def test_nan_pixels_fail_without_leaving_files(tmp_path: Path) -> None:
    rgb = _gradient()
    rgb[3, 3, 1] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        save_image(tmp_path / "nan.png", rgb)
    assert list(tmp_path.iterdir()) == []


def test_wrong_shape_fails_without_leaving_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="H×W×3"):
        save_image(tmp_path / "flat.png", np.zeros((32, 32), dtype=np.float32))
    assert list(tmp_path.iterdir()) == []


def test_encoder_failure_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("encoder exploded")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(ImageError, match="encoder exploded"):
        save_image(tmp_path / "out.png", _gradient())
    assert list(tmp_path.iterdir()) == []


def test_write_failure_removes_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replaced: list[Path] = []

    def broken_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        replaced.append(Path(src))
        assert Path(src).exists()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image.os, "replace", broken_replace)
    with pytest.raises(ImageError, match="No space left"):
        save_image(tmp_path / "out.png", _gradient())
    [temp] = replaced
    assert temp.parent == tmp_path
    assert temp.name.startswith(".")
    assert temp.name.endswith(".tmp")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_kept_when_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keep.png"
    path.write_bytes(b"previous result")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(image.os, "fsync", broken_fsync)
    with pytest.raises(ImageError, match=r"keep\.png"):
        save_image(path, _gradient())
    assert path.read_bytes() == b"previous result"
    assert list(tmp_path.iterdir()) == [path]


def test_existing_file_replaced_when_write_succeeds(tmp_path: Path) -> None:
    path = tmp_path / "replace.png"
    path.write_bytes(b"previous result")
    save_image(path, _gradient())
    assert load_image(path).rgb.shape == (32, 48, 3)
    assert list(tmp_path.iterdir()) == [path]


# --- in-memory PNG ------------------------------------------------------------------------


def test_encode_png_bytes_load_back() -> None:
    rgb = _gradient()
    alpha = np.full((32, 48), 0.25, dtype=np.float32)
    data = encode_png(rgb, alpha, metadata=METADATA)
    assert data.startswith(b"\x89PNG")
    loaded = load_image(data)
    np.testing.assert_allclose(loaded.rgb, rgb, atol=0.5 / 255)
    assert loaded.alpha is not None
    np.testing.assert_allclose(loaded.alpha, 64 / 255, atol=1e-6)
    assert read_metadata(data) == METADATA


def test_encode_png_writes_16_bits_when_asked() -> None:
    rgb = _deep_rgb() / 65535.0
    loaded = load_image(encode_png(rgb.astype(np.float32), bits=16))
    np.testing.assert_allclose(loaded.rgb, rgb, atol=1e-5)
    assert loaded.source_metadata.bits == 16


def test_encode_png_matches_save_image(tmp_path: Path) -> None:
    path = tmp_path / "same.png"
    save_image(path, _gradient(), metadata=METADATA)
    assert encode_png(_gradient(), metadata=METADATA) == path.read_bytes()


@pytest.mark.parametrize(("source", "out_format", "suffix"), [
    ("a.JPG", "same", ".JPG"), ("a.webp", "same", ".webp"), ("a.bmp", "same", ".png"),
    ("a.gif", "same", ".png"), ("a.jpg", "png", ".png"), ("a.png", "tif", ".tif"),
    ("a.heic", "same", ".jpg"), ("a.HIF", "same", ".jpg"), ("a.avif", "same", ".avif"),
    ("a.png", "avif", ".avif"),
])
def test_an_output_takes_the_format_asked_for_or_the_inputs_where_stylekit_can(source, out_format, suffix):
    assert output_suffix(source, out_format) == suffix


@pytest.mark.parametrize(("caption", "found"), [
    ('{"software": "stylekit 0.1.0", "content": "a.png"}',
     {"software": "stylekit 0.1.0", "content": "a.png"}),
    ("Holiday at the sea", {}), ('{"title": "a camera app\'s JSON"}', {}),
])
def test_metadata_an_earlier_version_kept_in_the_caption_is_still_read(tmp_path, caption, found):
    exif = Image.Exif()
    exif[ExifTags.Base.ImageDescription] = caption
    Image.new("RGB", (32, 32)).save(tmp_path / "out.jpg", exif=exif.tobytes())
    assert read_metadata(tmp_path / "out.jpg") == found
