"""Colour profiles: an image's colour description turned into sRGB, at 8 bits and at 16."""

from __future__ import annotations

import logging
import struct

import numpy as np
import pytest
from PIL import Image

from stylekit import icc

P3 = {"color_primaries": 12, "transfer_characteristics": 13,
      "color_primary_red_x": 0.680, "color_primary_red_y": 0.320,
      "color_primary_green_x": 0.265, "color_primary_green_y": 0.690,
      "color_primary_blue_x": 0.150, "color_primary_blue_y": 0.060,
      "color_primary_white_x": 0.3127, "color_primary_white_y": 0.3290}
P3_TO_SRGB = np.array([[1.2249, -0.2247, 0.0], [-0.0420, 1.0419, 0.0], [-0.0197, -0.0786, 1.0979]])


def _decode(values: np.ndarray) -> np.ndarray:
    return np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)


def _encode(linear: np.ndarray) -> np.ndarray:
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def _para(kind: int, *numbers: float) -> bytes:
    return b"para" + bytes(4) + struct.pack(">HH", kind, 0) + b"".join(
        struct.pack(">i", round(n * 65536)) for n in numbers)


def test_an_srgb_colour_description_needs_no_profile() -> None:
    assert icc.from_nclx({**P3, "color_primaries": 1}, "'x.heic'") is None


def test_a_display_p3_colour_description_converts_p3_to_srgb() -> None:
    colour = np.array([200, 100, 50], dtype=np.uint8)
    converted = icc.to_srgb(Image.fromarray(colour[None, None]), icc.from_nclx(P3, "'x.heic'"))
    expected = _encode(np.clip(P3_TO_SRGB @ _decode(colour / 255.0), 0.0, 1.0)) * 255
    np.testing.assert_allclose(np.asarray(converted)[0, 0], expected, atol=1.0)


def test_a_colour_description_giving_only_its_codes_converts_as_its_chromaticities_do() -> None:
    colour = np.array([[[200, 100, 50], [0, 230, 20]]], dtype=np.uint8)
    by_codes = icc.from_nclx({"color_primaries": 12, "transfer_characteristics": 13}, "'x.avif'")
    converted = icc.to_srgb(Image.fromarray(colour), by_codes)
    expected = icc.to_srgb(Image.fromarray(colour), icc.from_nclx(P3, "'x.heic'"))
    np.testing.assert_allclose(np.asarray(converted), np.asarray(expected), atol=1)
    assert np.abs(np.asarray(converted).astype(int) - colour).max() > 10  # really converted


def test_an_hdr_colour_description_says_it_is_not_tone_mapped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="stylekit.icc"):
        icc.from_nclx({"color_primaries": 9, "transfer_characteristics": 16}, "'hdr.heic'")
    assert "'hdr.heic' is HDR (PQ)" in caplog.text


def test_srgb_tagged_16_bit_colour_comes_back_unchanged() -> None:
    rgb = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    converted = rgb.copy()
    icc.deep_to_srgb(converted, icc.srgb_profile())
    np.testing.assert_allclose(converted, rgb, atol=2e-5)


@pytest.mark.parametrize(("tag", "formula"), [
    (_para(0, 2.2), lambda x: x ** 2.2),
    (_para(1, 2.0, 1.2, -0.1), lambda x: np.where(x >= 0.1 / 1.2, (1.2 * x - 0.1) ** 2.0, 0.0)),
    (_para(2, 2.0, 1.2, -0.1, 0.05), lambda x: np.where(x >= 0.1 / 1.2, (1.2 * x - 0.1) ** 2.0 + 0.05, 0.05)),
    (_para(3, 2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045), _decode),
    (_para(4, 2.0, 0.9, 0.1, 0.5, 0.2, 0.01, 0.02),
     lambda x: np.where(x >= 0.2, (0.9 * x + 0.1) ** 2.0 + 0.01, 0.5 * x + 0.02)),
    (b"curv" + bytes(4) + struct.pack(">I", 0), lambda x: x),
    (b"curv" + bytes(4) + struct.pack(">IH", 1, 563), lambda x: x ** (563 / 256)),
    (b"curv" + bytes(4) + struct.pack(">I3H", 3, 0, 16384, 65535),
     lambda x: np.interp(x, [0.0, 0.5, 1.0], [0.0, 0.25, 1.0])),
])
def test_every_kind_of_icc_tone_curve_follows_its_formula(tag: bytes, formula) -> None:
    values = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(icc._tone_curve(tag)(values), formula(values), atol=1e-4)


def test_colour_converted_a_band_of_rows_at_a_time_is_converted_as_it_would_be_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rgb = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    p3 = icc.from_nclx(P3, "'x.heic'")
    whole = rgb.copy()
    icc.deep_to_srgb(whole, p3)
    monkeypatch.setattr(icc, "_BLOCK", 40)  # pixels at a time: bands of two rows
    banded = rgb.copy()
    icc.deep_to_srgb(banded, p3)
    np.testing.assert_array_equal(banded, whole)
    assert np.abs(whole - rgb).max() > 0.05  # really converted


def test_a_profile_made_from_nclx_has_a_valid_header():
    profile = icc.from_nclx(P3, "'x.heic'")
    assert len(profile) == struct.unpack(">I", profile[:4])[0] and profile[36:40] == b"acsp"
    assert struct.unpack(">I", profile[64:68])[0] == 0  # perceptual rendering intent
    illuminant = [value / 65536 for value in struct.unpack(">3i", profile[68:80])]
    assert illuminant == pytest.approx([0.9642, 1.0, 0.8249], abs=1e-4)  # D50, where ICC puts it
