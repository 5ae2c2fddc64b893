"""A port of docs/onnx-contract.md ("Preprocessing") written from the formulas alone, in numpy.

Not used by the package: the tests check that it equals the Python path (Pillow) on every value,
which is what the contract promises a port written from the docs can reach."""

from __future__ import annotations

import numpy as np


def _cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                    np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))


def _linear(t: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1 - np.abs(t))


def resize_pass(x: np.ndarray, n_out: int, axis: int, kind: str = "bicubic") -> np.ndarray:
    """One pass of the contract's resize along ``axis`` of a uint8 array."""
    n_in = x.shape[axis]
    s = n_in / n_out
    f = max(s, 1.0)
    support = (2.0 if kind == "bicubic" else 1.0) * f
    kernel = _cubic if kind == "bicubic" else _linear
    q = np.zeros((n_out, n_in), np.int64)
    for i in range(n_out):
        c = (i + 0.5) * s
        lo = max(int(c - support + 0.5), 0)
        hi = min(int(c + support + 0.5), n_in)
        j = np.arange(lo, hi)
        k = kernel((j - c + 0.5) / f)
        w = k / k.sum()
        q[i, lo:hi] = np.where(w >= 0, np.trunc(w * 2**22 + 0.5), np.trunc(w * 2**22 - 0.5)).astype(np.int64)
    xm = np.moveaxis(x.astype(np.int64), axis, 0)
    y = np.tensordot(q, xm, axes=(1, 0))
    y = np.clip((y + 2**21) >> 22, 0, 255).astype(np.uint8)
    return np.moveaxis(y, 0, axis)


def resize(rgb: np.ndarray, height: int, width: int, kind: str = "bicubic") -> np.ndarray:
    """uint8 [h, w, 3] -> [height, width, 3]: the width pass, then the height pass."""
    if rgb.shape[1] != width:
        rgb = resize_pass(rgb, width, 1, kind)
    if rgb.shape[0] != height:
        rgb = resize_pass(rgb, height, 0, kind)
    return rgb


def normalise(rgb: np.ndarray, mean, std, scale: float = 1 / 255) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W]."""
    f32 = np.float32
    x = rgb.astype(f32) * f32(scale)
    return ((x - np.asarray(mean, f32)) / np.asarray(std, f32)).transpose(2, 0, 1).copy()


def composite_on_white(c: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    c, a = c.astype(np.int64), alpha.astype(np.int64)
    return ((2 * (c * a + 255 * (255 - a)) + 255) // 510).astype(np.uint8)  # round(x / 255) = floor((2x + 255) / 510)


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    c = cmyk[..., :3].astype(np.int64)
    nk = 255 - cmyk[..., 3:4].astype(np.int64)
    return (nk - (2 * c * nk + 255) // 510).clip(0, 255).astype(np.uint8)


def grey16_to_8(v: np.ndarray) -> np.ndarray:
    return ((2 * v.astype(np.int64) + 257) // 514).astype(np.uint8)  # round(v / 257)


def rgb16_to_8(v: np.ndarray) -> np.ndarray:
    return (v.astype(np.int64) >> 8).astype(np.uint8)
