"""Real-image ImageFolders for tests and benches: Fashion-MNIST (Debian) and the textile JPEGs,
plus the messy files a real folder holds (truncated JPEG, text named .png, CMYK, 16-bit PNG)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from itae_export import fashion_mnist as _fmnist

FASHION_CLASSES = _fmnist.CLASSES


def textile_root() -> Path | None:
    try:
        import conformal_clip_data
    except ImportError:
        return None
    root = Path(conformal_clip_data.__file__).parent / "data" / "textile_images"
    return root if root.is_dir() else None


def fashion_mnist(split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) from Debian's dataset-fashion-mnist.

    Skips the calling test (with a reason) when the package is not installed.
    """
    if not _fmnist.available(split):
        import pytest

        pytest.skip(f"{_fmnist.ROOT} is missing: apt-get install dataset-fashion-mnist")
    return _fmnist.load(split)


def fashion_folder(root: str | Path, per_class: int = 30, classes: int = 10, fmt: str = "png", seed: int = 0) -> dict[str, str]:
    """Write an ImageFolder ``root/<class>/<nnnn>.<fmt>``; returns {relative path: class}."""
    from PIL import Image

    root = Path(root)
    x, y = fashion_mnist()
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for c in range(classes):
        idx = rng.choice(np.flatnonzero(y == c), per_class, replace=False)
        d = root / FASHION_CLASSES[c]
        d.mkdir(parents=True, exist_ok=True)
        for i in idx:
            rel = f"{FASHION_CLASSES[c]}/{i:05d}.{fmt}"
            Image.fromarray(x[i], mode="L").save(root / rel)
            out[rel] = FASHION_CLASSES[c]
    return out


def textile_folder(root: str | Path, per_class: int = 20) -> dict[str, str]:
    """Copy ``per_class`` textile JPEGs of each class into ``root/<class>/``; {relative path: class}."""
    src = textile_root()
    if src is None:
        raise FileNotFoundError("conformal-clip-data is not installed")
    root = Path(root)
    out: dict[str, str] = {}
    classes = sorted({p.parent for p in src.rglob("*.jpg")})
    for cdir in classes:
        name = cdir.name
        (root / name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cdir.glob("*.jpg"))[:per_class]:
            shutil.copyfile(f, root / name / f.name)
            out[f"{name}/{f.name}"] = name
    return out


def add_messy_files(root: str | Path, labelled: dict[str, str]) -> dict[str, dict[str, str]]:
    """Add bad and unusual files to an ImageFolder built above.

    Returns {"good": {rel: class} of the extra files that must decode (CMYK JPEG, 16-bit PNG,
    RGBA PNG, palette GIF, upper-case extension), "bad": {rel: what} of those that must be skipped,
    "ignored": {rel: why} of those the scan must not see}.
    """
    from PIL import Image

    root = Path(root)
    rels = sorted(labelled)
    by_class: dict[str, list[str]] = {}
    for r in rels:
        by_class.setdefault(labelled[r], []).append(r)
    classes = sorted(by_class)
    good: dict[str, str] = {}

    def source(i: int) -> tuple[Image.Image, str]:
        cls = classes[i % len(classes)]
        with Image.open(root / by_class[cls][0]) as im:
            return im.convert("RGB"), cls

    img, cls = source(0)
    img.convert("CMYK").save(root / cls / "zz_cmyk.jpg", quality=95)
    good[f"{cls}/zz_cmyk.jpg"] = cls

    img, cls = source(1)
    a16 = np.asarray(img.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(a16).save(root / cls / "zz_16bit.png")
    assert Image.open(root / cls / "zz_16bit.png").mode.startswith("I")
    good[f"{cls}/zz_16bit.png"] = cls

    img, cls = source(2)
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / cls / "zz_rgba.png")
    good[f"{cls}/zz_rgba.png"] = cls

    img, cls = source(3)
    img.convert("P").save(root / cls / "zz_palette.GIF")
    good[f"{cls}/zz_palette.GIF"] = cls

    bad: dict[str, str] = {}
    img, cls = source(4)
    full = root / cls / "zz_full.jpg"
    img.save(full, quality=95)
    data = full.read_bytes()
    full.unlink()
    (root / cls / "zz_truncated.jpg").write_bytes(data[: len(data) // 2])
    bad[f"{cls}/zz_truncated.jpg"] = "truncated JPEG"
    (root / cls / "zz_text.png").write_text("this is not a picture\n")
    bad[f"{cls}/zz_text.png"] = "text file named .png"
    (root / cls / "zz_empty.webp").write_bytes(b"")
    bad[f"{cls}/zz_empty.webp"] = "empty file"

    ignored: dict[str, str] = {}
    rgba_rel = next(r for r in good if r.endswith("zz_rgba.png"))
    cmyk_rel = next(r for r in good if r.endswith("zz_cmyk.jpg"))
    (root / cls / ".hidden.png").write_bytes((root / rgba_rel).read_bytes())
    ignored[f"{cls}/.hidden.png"] = "hidden file"
    (root / ".thumbs").mkdir(exist_ok=True)
    (root / ".thumbs" / "x.jpg").write_bytes((root / cmyk_rel).read_bytes())
    ignored[".thumbs/x.jpg"] = "hidden folder"
    (root / cls / "notes.txt").write_text("not an image extension\n")
    ignored[f"{cls}/notes.txt"] = "not an image extension"
    return {"good": good, "bad": bad, "ignored": ignored}


_MODEL_CACHE: dict[tuple, Path] = {}


def tiny_onnx(cache_dir: str | Path, name: str = "dinov2_vits14", resolution: int = 56, seed: int = 0,
              precision: str = "fp32") -> Path:
    """A tiny random-weight model exported with ``export_onnx`` (once per process and arguments)."""
    key = (name, resolution, seed, precision)
    if key in _MODEL_CACHE and _MODEL_CACHE[key].is_file():
        return _MODEL_CACHE[key]
    from tiny import tiny_spec

    from itae_export.model.vit import build_model, init_random_
    from itae_export.onnx.export import export_onnx
    from itae_export.registry import ITAEOptions

    spec = tiny_spec(name)
    model = init_random_(build_model(spec), seed=seed)
    out = Path(cache_dir) / f"tiny_{name}_{resolution}_{seed}_{precision}" / "model.onnx"
    res = export_onnx(spec, ITAEOptions.for_model(spec), out, model=model, resolution=resolution,
                      precision=precision, validate=False)
    _MODEL_CACHE[key] = res.path
    return res.path
