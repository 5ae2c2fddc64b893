"""docs/onnx-contract.md, "Preprocessing": every formula against the Python path (Pillow)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import portref
import pytest
from PIL import Image

from itae_export.images import (
    PreprocessSpec,
    decode_image,
    pil_resize,
    preprocess,
    to_rgb,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_golden import linear_rgb_icc, png_rgb16  # noqa: E402

PRE = PreprocessSpec(224, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_alpha_on_white_every_value():
    c, a = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([c, c, c, a], -1).astype(np.uint8)
    got = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))[..., 0]
    np.testing.assert_array_equal(got, portref.composite_on_white(c, a))


def test_cmyk_every_c_and_k():
    c, k = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    cmyk = np.stack([c, c // 2, 255 - c, k], -1).astype(np.uint8)
    got = np.asarray(to_rgb(Image.fromarray(cmyk, "CMYK")))
    np.testing.assert_array_equal(got, portref.cmyk_to_rgb(cmyk))


def test_grey16_every_value(tmp_path):
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(v).save(tmp_path / "g.png")
    img, notes = decode_image(tmp_path / "g.png")
    assert "16-bit scaled to 8-bit" in notes
    np.testing.assert_array_equal(np.asarray(img)[..., 1], portref.grey16_to_8(v))


def test_rgb16_takes_the_high_byte(tmp_path):
    v = np.random.default_rng(0).integers(0, 65536, (40, 30, 3)).astype(np.uint16)
    (tmp_path / "c.png").write_bytes(png_rgb16(v))
    img, _ = decode_image(tmp_path / "c.png")
    np.testing.assert_array_equal(np.asarray(img), portref.rgb16_to_8(v))
    assert not np.array_equal(np.asarray(img), portref.grey16_to_8(v))  # not the grey rule


def test_trns_colour_key_on_rgb_is_ignored(tmp_path):
    a = np.full((4, 4, 3), 7, np.uint8)
    Image.fromarray(a).save(tmp_path / "t.png", transparency=(7, 7, 7))
    assert Image.open(tmp_path / "t.png").info.get("transparency") == (7, 7, 7)
    np.testing.assert_array_equal(np.asarray(decode_image(tmp_path / "t.png")[0]), a)
    Image.fromarray(a[..., 0]).save(tmp_path / "l.png", transparency=7)
    assert Image.open(tmp_path / "l.png").info.get("transparency") == 7
    np.testing.assert_array_equal(np.asarray(decode_image(tmp_path / "l.png")[0]), a)


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :5] = 255  # a white left column band
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "r.png", exif=exif)
    got = np.asarray(decode_image(tmp_path / "r.png")[0])
    assert got.shape == (40, 20, 3) and got[:5].min() == 255 and got[5:].max() == 0  # left column -> top row


def test_icc_profile_is_ignored(tmp_path):
    """A linear-gamma profile (tests/golden's): applying it would move the values a lot; we do not."""
    from PIL import ImageCms

    a = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "i.png", icc_profile=linear_rgb_icc())
    assert Image.open(tmp_path / "i.png").info.get("icc_profile") == linear_rgb_icc()
    np.testing.assert_array_equal(np.asarray(decode_image(tmp_path / "i.png")[0]), a)
    managed = ImageCms.profileToProfile(Image.fromarray(a), ImageCms.ImageCmsProfile(io.BytesIO(linear_rgb_icc())),
                                        ImageCms.createProfile("sRGB"))
    assert np.abs(np.asarray(managed).astype(int) - a).mean() > 20  # what a colour-managing decoder would do


SIZES = [(427, 640), (97, 61), (224, 300), (41, 500), (224, 224), (1, 1), (223, 225), (900, 300), (640, 427), (552, 97)]


@pytest.mark.parametrize("kind", ["bicubic", "bilinear"])
def test_resize_formula_equals_pillow(kind):
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(2)
    pre = PreprocessSpec(224, 224, PRE.mean, PRE.std, interpolation=kind)
    arrays = list(load_sample_images().images) + [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in SIZES]
    for a in arrays:
        ours = portref.resize(a, 224, 224, kind)
        np.testing.assert_array_equal(ours, np.asarray(pil_resize(Image.fromarray(a), pre)), err_msg=str(a.shape))


def test_normalisation_equals_the_python_path():
    a = np.random.default_rng(3).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(portref.normalise(a, PRE.mean, PRE.std), preprocess(Image.fromarray(a), PRE))
