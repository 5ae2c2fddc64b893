"""Image folders: a safe recursive scan, a decoder for every PIL mode, and the manifest's preprocessing.

The preprocessing is read from the exported model's manifest (``Preprocessing.to_dict()``), so
there is no second copy of it to keep in sync with the exporter.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itae_export.errors import InputError, ITAEError

# Lower-case suffixes; the scan compares case-insensitively.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico"}
)


class ImageDecodeError(ITAEError):
    """One image that cannot be used; ``reason`` is the short text written to skipped.csv."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # picklable across a process pool
        return (type(self), (self.path, self.reason))


def scan_images(root: str | os.PathLike, extensions=IMAGE_EXTENSIONS) -> list[Path]:
    """Every image file under ``root``, recursively, sorted by relative path (POSIX order).

    Hidden files and folders (a leading dot) are ignored. Symbolic links are followed, but each
    real folder is entered once, so link loops end. Raises InputError for a missing root.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder" if root.exists() else f"{root}: no such folder")
    found: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()

    def walk(d: Path) -> None:
        try:
            st = d.stat()
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            return  # a symlink loop, or a second link to a folder already scanned
        seen_dirs.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: os.fsencode(e.name))  # the first link found wins, always the same
        except OSError:
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():  # follows links
                    walk(Path(e.path))
                elif e.is_file() and os.path.splitext(e.name)[1].lower() in extensions:
                    found.append(Path(e.path))
            except OSError:
                continue  # a dangling link or a file that vanished

    walk(root)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found


# ---------------------------------------------------------------- decoding


def _white_composite(img, note: list[str]):
    from PIL import Image

    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    note.append("alpha composited on white")
    return Image.alpha_composite(bg, rgba).convert("RGB")


def to_rgb(img, note: list[str] | None = None):
    """Any PIL image as 8-bit RGB. Transparency is composited on white; 16-bit and 32-bit
    integer data is scaled to 0-255 (65535 -> 255); float data in [0, 1] is scaled by 255,
    other float data is clipped to 0-255. Appends what it did to ``note``."""
    from PIL import Image

    note = note if note is not None else []
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _white_composite(img, note)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img)
        if a.dtype.byteorder == ">" or mode.endswith("B"):
            a = a.astype(a.dtype.newbyteorder("="))
        a = a.astype(np.float64)
        if mode.startswith("I;16") or a.max(initial=0) > 255:
            a = np.clip(a, 0, 65535) / 257.0  # 16-bit range, as PNG and TIFF store it
            note.append("16-bit scaled to 8-bit")
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
            note.append("float [0,1] scaled to 8-bit")
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    if mode == "CMYK":
        note.append("CMYK converted to RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, LAB, HSV


# Images above this many pixels are refused before decoding (skipped.csv says so): a decoded RGB
# image costs 3 bytes a pixel in every decode worker. 120 MP covers 108 MP phone photos (~360 MB).
DEFAULT_MAX_PIXELS = 120_000_000


def decode_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """(RGB PIL image, notes): EXIF orientation applied, every mode converted to RGB.

    Raises ImageDecodeError with a reason for a corrupt, truncated, oversized (above
    ``max_pixels``, read from the header before decoding, or PIL's decompression-bomb limit) or
    non-image file.
    """
    try:
        if os.path.getsize(path) == 0:
            raise ImageDecodeError(path, "empty file")
    except OSError as e:
        raise ImageDecodeError(path, f"cannot read: {e.strerror or e}") from None
    return _decode(path, path, max_pixels)


def decode_bytes(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """:func:`decode_image` for an image held in memory (a tar member, say); ``name`` labels errors."""
    if not data:
        raise ImageDecodeError(name, "empty file")
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(src, path, max_pixels: int | None):
    from PIL import Image, ImageOps, UnidentifiedImageError

    note: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                if max_pixels and img.width * img.height > max_pixels:
                    raise ImageDecodeError(path, f"{img.width}x{img.height} is {img.width * img.height / 1e6:.0f} MP, "
                                                 f"above --max-pixels {max_pixels}")
                img.load()  # decode now: a truncated file fails here, not later
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception:  # noqa: BLE001 - a broken EXIF block: keep the pixels as stored
                    note.append("EXIF orientation unreadable, ignored")
                return to_rgb(img, note), note
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(path, f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image PIL can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            msg = f"truncated image ({msg})"
        raise ImageDecodeError(path, f"cannot decode: {msg}") from None
    except MemoryError:
        raise ImageDecodeError(path, "out of memory while decoding") from None


@dataclass(frozen=True)
class PreprocessSpec:
    """The manifest's ``preprocessing`` block, checked once."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1 / 255
    resize: str = "squash"
    interpolation: str = "bicubic"

    @classmethod
    def from_manifest(cls, pre: dict) -> "PreprocessSpec":
        if not isinstance(pre, dict):
            raise InputError("manifest: 'preprocessing' is missing or not an object")
        try:
            res = pre["resolution"]
            h, w = (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))
            spec = cls(h, w, tuple(map(float, pre["mean"])), tuple(map(float, pre["std"])),
                       float(pre.get("scale", 1 / 255)), pre.get("resize", "squash"),
                       pre.get("interpolation", "bicubic"))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise InputError(f"manifest: bad 'preprocessing' block ({e!r})") from e
        if spec.resize != "squash":
            raise InputError(f"manifest: resize {spec.resize!r} is not supported (only 'squash')")
        if spec.interpolation not in _RESAMPLE:
            raise InputError(f"manifest: interpolation {spec.interpolation!r} is not one of {', '.join(_RESAMPLE)}")
        if pre.get("channel_order", "RGB") != "RGB" or pre.get("layout", "NCHW") != "NCHW":
            raise InputError("manifest: only RGB channel order and NCHW layout are supported")
        if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
            raise InputError("manifest: mean and std must have 3 entries, std > 0")
        return spec


_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}  # PIL.Image.Resampling values


def pil_resize(img, pre: PreprocessSpec):
    """RGB PIL image -> RGB PIL image of (pre.width, pre.height): the squash resize, none when the
    size already fits. Two single-axis Pillow resizes, the width first, then the height, each
    rounded to uint8 (docs/onnx-contract.md): one two-axis ``Image.resize`` picks the order of its
    passes by the shape, which a port could not know. ``reducing_gap=None``: no draft or reduce."""
    resample = _RESAMPLE[pre.interpolation]
    if img.width != pre.width:
        img = img.resize((pre.width, img.height), resample=resample)
    if img.height != pre.height:
        img = img.resize((pre.width, pre.height), resample=resample)
    return img


def preprocess(img, pre: PreprocessSpec) -> np.ndarray:
    """RGB PIL image -> float32 [3, H, W]: squash-resize, scale, normalise."""
    a = np.asarray(pil_resize(img, pre))  # uint8 [H, W, 3]
    lut = _normalize_lut(pre.scale, pre.mean, pre.std)
    out = np.empty((3, pre.height, pre.width), np.float32)
    for c in range(3):  # one gather per channel writes NCHW directly (5x faster than float math)
        np.take(lut[c], a[..., c], out=out[c])
    return out


@functools.lru_cache(maxsize=8)
def _normalize_lut(scale: float, mean: tuple, std: tuple) -> np.ndarray:
    """[3, 256] float32: (v * scale - mean[c]) / std[c] for every 8-bit value v, in float32."""
    v = np.arange(256, dtype=np.float32)[None, :] * np.float32(scale)
    return (v - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]


def load_image(path: str | os.PathLike, preprocessing: PreprocessSpec | dict) -> np.ndarray:
    """Decode and preprocess one image file to float32 [3, H, W]; raises ImageDecodeError."""
    pre = preprocessing if isinstance(preprocessing, PreprocessSpec) else PreprocessSpec.from_manifest(preprocessing)
    img, _ = decode_image(path)
    try:
        return preprocess(img, pre)
    except (OSError, ValueError, MemoryError) as e:
        raise ImageDecodeError(path, f"cannot resize: {e}") from None


def sample_evenly(paths: list, n: int | None) -> list:
    """``n`` items evenly spaced over ``paths`` (all of them when ``n`` is None or not smaller)."""
    if n is None or len(paths) <= n:
        return list(paths)
    idx = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in sorted(set(idx.tolist()))]
