"""Scanning, decoding every PIL mode, and the manifest's preprocessing."""

import os

import numpy as np
import pytest
from PIL import Image

from itae_export.errors import InputError
from itae_export.images import (
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    load_image,
    preprocess,
    scan_images,
)

PRE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resolution": [28, 42], "resize": "squash",
       "interpolation": "bicubic", "scale": 1 / 255, "channel_order": "RGB", "layout": "NCHW"}


def _rgb(w=20, h=12, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_scan_sorted_recursive_case_insensitive_hidden_ignored(tmp_path):
    for rel in ["b/2.PNG", "b/10.jpg", "a/x.JpEg", "top.webp", "a/deep/er/z.tiff", "a/.hidden.png",
                ".cache/y.jpg", "a/readme.txt", "a/noext"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    rels = [p.relative_to(tmp_path).as_posix() for p in scan_images(tmp_path)]
    assert rels == ["a/deep/er/z.tiff", "a/x.JpEg", "b/10.jpg", "b/2.PNG", "top.webp"]


def test_scan_survives_symlink_loops_and_dangling_links(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "img.png").write_bytes(b"x")
    os.symlink(tmp_path / "d", tmp_path / "d" / "e" / "loop")  # d/e/loop -> d
    os.symlink(tmp_path / "missing.png", tmp_path / "d" / "dangling.png")
    rels = [p.relative_to(tmp_path).as_posix() for p in scan_images(tmp_path)]
    assert rels == ["d/e/img.png"]


def test_scan_missing_root(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        scan_images(tmp_path / "nope")
    assert scan_images(tmp_path) == []


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGB", "1", "YCbCr"])
def test_opaque_modes_become_rgb(tmp_path, mode):
    src = _rgb()
    img = src.convert(mode)
    out, _ = decode_image(_save(img, tmp_path, mode))
    assert out.mode == "RGB" and out.size == src.size
    # each mode's own conversion to RGB is the reference
    ref = np.asarray(Image.open(tmp_path / f"{mode}.{_ext(mode)}").convert("RGB"))
    assert np.array_equal(np.asarray(out), ref)


def _ext(mode):
    return {"CMYK": "jpg", "YCbCr": "jpg"}.get(mode, "png" if mode != "P" else "gif")


def _save(img, d, name):
    path = d / f"{name}.{_ext(img.mode if name == img.mode else name)}"
    img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)
    return path


def test_alpha_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 200  # red 200
    a[..., 3] = 0
    a[0, 0, 3] = 255
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    out, notes = decode_image(tmp_path / "rgba.png")
    px = np.asarray(out)
    assert px[0, 0].tolist() == [200, 0, 0]  # opaque pixel kept
    assert px[1, 1].tolist() == [255, 255, 255]  # transparent pixel is white, not black
    assert "alpha composited on white" in notes
    la = Image.fromarray(np.stack([np.full((3, 3), 10, np.uint8), np.zeros((3, 3), np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert np.asarray(decode_image(tmp_path / "la.png")[0]).min() == 255


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    px = np.asarray(decode_image(tmp_path / "p.png")[0])
    assert px[0, 0].tolist() == [255, 0, 0] and px[3, 3].tolist() == [255, 255, 255]


def test_16bit_png_scaled_to_8bit(tmp_path):
    a = np.array([[0, 257, 32896, 65535]], np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out, notes = decode_image(tmp_path / "g16.png")
    assert np.asarray(out)[0, :, 0].tolist() == [0, 1, 128, 255]
    assert "16-bit scaled to 8-bit" in notes


def test_32bit_int_and_float_images(tmp_path):
    Image.fromarray(np.array([[0, 100, 255]], np.int32), "I").save(tmp_path / "i.tif")
    assert np.asarray(decode_image(tmp_path / "i.tif")[0])[0, :, 0].tolist() == [0, 100, 255]  # 8-bit range kept
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F").save(tmp_path / "f.tif")
    assert np.asarray(decode_image(tmp_path / "f.tif")[0])[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 5, 10))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out, _ = decode_image(tmp_path / "rot.jpg")
    assert out.size == (10, 30)
    assert np.asarray(out)[1, 5, 2] > 200  # the blue band is now at the top


def test_bad_files_raise_with_reason(tmp_path):
    _rgb(64, 64).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    for name, reason in [("trunc.jpg", "truncated"), ("text.png", "not an image"), ("empty.png", "empty file")]:
        with pytest.raises(ImageDecodeError, match=reason) as e:
            decode_image(tmp_path / name)
        assert e.value.path.endswith(name)


def test_decompression_bomb_is_skipped(tmp_path, monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 > 2 * 1000 pixels
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(tmp_path / "big.png")


def test_preprocess_squash_bicubic_normalize(tmp_path):
    img = _rgb(50, 30, seed=3)
    pre = PreprocessSpec.from_manifest(PRE)
    x = preprocess(img, pre)
    assert x.shape == (3, 28, 42) and x.dtype == np.float32
    ref = np.asarray(img.resize((42, 28), Image.Resampling.BICUBIC), np.float64) / 255.0
    ref = ((ref - np.array(PRE["mean"])) / np.array(PRE["std"])).transpose(2, 0, 1)
    np.testing.assert_allclose(x, ref, atol=1e-5)
    img.save(tmp_path / "a.png")
    np.testing.assert_allclose(load_image(tmp_path / "a.png", PRE), x)


def test_bad_preprocessing_manifest():
    with pytest.raises(InputError, match="resize"):
        PreprocessSpec.from_manifest({**PRE, "resize": "center-crop"})
    with pytest.raises(InputError, match="preprocessing"):
        PreprocessSpec.from_manifest({"mean": [0, 0, 0]})
