"""The rules docs/onnx-contract.md adds for orientation sources, PNG bit depths and alpha, CMYK
and the size limit, each checked against the Python path (itae_export.images.decode_image) on
files written byte by byte (tests/hostile.py)."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hostile import photo, png, raw_profile, tiff_exif, write_kinds, xmp_packet
from PIL import Image

from itae_export.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = (ROOT / "docs" / "onnx-contract.md").read_text()


def white(c, a):
    """The contract's composite on white, integers."""
    c, a = np.asarray(c, np.int64), np.asarray(a, np.int64)
    return ((2 * (c * a + 255 * (255 - a)) + 255) // 510).astype(np.uint8)


def rgb_of(path) -> np.ndarray:
    return np.asarray(decode_image(path)[0])


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    return write_kinds(tmp_path_factory.mktemp("kinds"))


ROT = {1: lambda a: a, 3: lambda a: a[::-1, ::-1], 5: lambda a: a.transpose(1, 0, 2),
       6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("name,orientation", [("png_exif6.png", 6), ("png_rawprofile8.png", 8), ("png_xmp5.png", 5),
                                              ("jpeg_xmp6.jpg", 6), ("webp_exif6.webp", 6), ("jpeg_exif3.jpg", 3)])
def test_every_orientation_source_is_applied(kinds, name, orientation):
    stored = np.asarray(Image.open(kinds[name]).convert("RGB"))
    np.testing.assert_array_equal(rgb_of(kinds[name]), ROT[orientation](stored))


def test_exif_orientation_1_hides_the_xmp_one(tmp_path):
    a = photo(30, 40)
    p = tmp_path / "both.png"
    p.write_bytes(png(a, 2, 8, extra=[(b"eXIf", tiff_exif(1)), (b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp_packet(6))]))
    np.testing.assert_array_equal(rgb_of(p), a)
    p.write_bytes(png(a, 2, 8, after_idat=[(b"eXIf", tiff_exif(3))]))  # after IDAT counts too
    np.testing.assert_array_equal(rgb_of(p), a[::-1, ::-1])
    p.write_bytes(png(a, 2, 8, extra=[(b"tEXt", b"Raw profile type exif\x00" + raw_profile(tiff_exif(6)))]))  # no Exif\0\0 prefix
    np.testing.assert_array_equal(rgb_of(p), np.rot90(a, -1))
    p.write_bytes(png(a, 2, 8, extra=[(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp_packet(6).replace(b'"6"', b"'6'"))]))
    np.testing.assert_array_equal(rgb_of(p), a)  # single quotes: not matched, as stated


def test_png_depths_and_alpha(kinds):
    grey = photo(90, 120).mean(-1)
    g16 = (grey * 257 + np.arange(120)[None, :] % 257).astype(np.int64)
    np.testing.assert_array_equal(rgb_of(kinds["grey16.png"])[..., 0], np.floor(g16 / 257 + 0.5).astype(np.uint8))
    for d, mul in ((1, 255), (2, 85), (4, 17)):
        v = (grey * ((1 << d) - 1) / 255).round().astype(np.int64)
        np.testing.assert_array_equal(rgb_of(kinds[f"grey{d}bit.png"]), np.repeat((v * mul)[..., None], 3, -1).astype(np.uint8))
    rgb = photo(90, 120).astype(np.int64)
    a16 = np.linspace(0, 65535, 120)[None, :].repeat(90, 0).astype(np.int64)
    np.testing.assert_array_equal(rgb_of(kinds["rgba16.png"]), white(np.minimum(rgb * 257 + 3, 65535) >> 8, (a16 >> 8)[..., None]))
    g = (grey * 257).astype(np.int64) >> 8
    np.testing.assert_array_equal(rgb_of(kinds["grey_alpha16.png"]), white(np.repeat(g[..., None], 3, -1), (a16 >> 8)[..., None]))
    # tRNS colour keys are ignored; a palette's tRNS is its alpha
    np.testing.assert_array_equal(rgb_of(kinds["rgb_trns_key.png"]), photo(90, 120))
    np.testing.assert_array_equal(rgb_of(kinds["grey_trns_key.png"])[..., 0], grey.astype(np.uint8))
    pal = np.array([[i * 16, 255 - i * 16, (i * 97) % 256] for i in range(16)], np.int64)
    idx = (grey / 16).astype(np.int64)
    np.testing.assert_array_equal(rgb_of(kinds["palette4_trns.png"]), white(pal[idx], (idx * 16)[..., None]))


def test_short_trns_table_means_opaque_past_its_end(tmp_path):
    pal = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200]], np.uint8)
    idx = np.array([[0, 1, 2]] * 4, np.uint8)
    p = tmp_path / "p.png"
    p.write_bytes(png(idx, 3, 8, palette=pal, trns=bytes([0])))
    np.testing.assert_array_equal(rgb_of(p)[0], [[255, 255, 255], [10, 200, 10], [10, 10, 200]])


def test_cmyk_with_and_without_adobe_marker(tmp_path):
    """Pillow reads every CMYK JPEG as Adobe-inverted: RGB = round(stored c * stored k / 255)."""
    rng = np.random.default_rng(0)
    cmyk = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
    p = tmp_path / "c.jpg"
    Image.fromarray(cmyk, "CMYK").save(p, quality=95)
    data = p.read_bytes()
    assert b"Adobe" in data  # Pillow writes the APP14 marker
    # the same file without its Adobe APP14 segment
    i = data.index(b"\xff\xee")
    n = struct.unpack(">H", data[i + 2:i + 4])[0]
    q = tmp_path / "c_noadobe.jpg"
    q.write_bytes(data[:i] + data[i + 2 + n:])
    for f in (p, q):
        with Image.open(f) as im:
            stored = 255 - np.asarray(im).astype(np.int64)  # Pillow's CMYK;I undone: the file's samples
        want = ((2 * stored[..., :3] * stored[..., 3:] + 255) // 510).astype(np.uint8)
        np.testing.assert_array_equal(rgb_of(f), want)
    assert "with or without an Adobe APP14 marker" in CONTRACT and "ycck_cmyk_convert" in CONTRACT


def _ycc_to_rgb(y, cb, cr):
    """libjpeg-turbo's YCbCr -> RGB (jdcolor.c, build_ycc_rgb_table: 16-bit fixed point, then clamped)."""
    def fix(x):
        return int(x * (1 << 16) + 0.5)

    half = 1 << 15
    cb, cr = cb - 128, cr - 128
    r = y + ((fix(1.40200) * cr + half) >> 16)
    g = y + ((-fix(0.34414) * cb - fix(0.71414) * cr + half) >> 16)
    b = y + ((fix(1.77200) * cb + half) >> 16)
    return [np.clip(c, 0, 255) for c in (r, g, b)]


def test_ycck_follows_the_stated_rule(tmp_path):
    """A YCCK JPEG: the same bitstream as a CMYK one with the Adobe transform byte set to 2, so the
    decoded samples are known (the CMYK file's) and the rule of the contract can be applied to them:
    the YCC triple to RGB, stored as 255 - R, 255 - G, 255 - B with K unchanged, then as CMYK."""
    rng = np.random.default_rng(1)
    cmyk = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
    p = tmp_path / "c.jpg"
    Image.fromarray(cmyk, "CMYK").save(p, quality=95)
    data = bytearray(p.read_bytes())
    i = data.index(b"Adobe")  # APP14: "Adobe", version (2 bytes), flags0, flags1, then the transform
    assert data[i + 11] == 0  # Pillow writes transform 0 (plain CMYK)
    data[i + 11] = 2
    q = tmp_path / "ycck.jpg"
    q.write_bytes(bytes(data))
    with Image.open(p) as im:
        stored = 255 - np.asarray(im).astype(np.int64)  # the decoded samples, as test_cmyk_... finds them
    r, g, b = _ycc_to_rgb(stored[..., 0], stored[..., 1], stored[..., 2])
    c, m, y, k = 255 - r, 255 - g, 255 - b, stored[..., 3]  # ycck_cmyk_convert
    want = np.stack([(2 * v * k + 255) // 510 for v in (c, m, y)], -1).astype(np.uint8)
    np.testing.assert_array_equal(rgb_of(q), want)


def test_size_limit_is_the_code_s_and_exact(tmp_path):
    assert f"{DEFAULT_MAX_PIXELS:,} pixels" in CONTRACT
    p = tmp_path / "wide.png"
    # a header that claims limit + 1 pixels: refused before decoding
    w = DEFAULT_MAX_PIXELS // 10 + 1
    ihdr = struct.pack(">IIBBBBB", w, 10, 8, 0, 0, 0, 0)
    chunk = lambda k, d: struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(ImageDecodeError, match=re.escape(f"above --max-pixels {DEFAULT_MAX_PIXELS}")):
        decode_image(p)
    # exactly the limit is not refused by the size check (it fails later, as a truncated file)
    with pytest.raises(ImageDecodeError) as e:
        decode_image(p, max_pixels=w * 10)
    assert "max-pixels" not in e.value.reason
