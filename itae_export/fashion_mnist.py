"""Fashion-MNIST from Debian's dataset-fashion-mnist: the real labelled images of the int8 guard,
the tests and the benchmarks."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from itae_export.errors import InputError

ROOT = Path(os.environ.get("ITAE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def available(split: str = "t10k", root: Path = ROOT) -> bool:
    return (root / f"{split}-images-idx3-ubyte.gz").is_file()


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(split: str = "t10k", root: Path = ROOT) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) of the ``t10k`` or ``train`` split."""
    if not available(split, root):
        raise InputError(f"no Fashion-MNIST at {root} (apt-get install dataset-fashion-mnist, or set "
                         "ITAE_FASHION_MNIST)")
    return _idx(root / f"{split}-images-idx3-ubyte.gz"), _idx(root / f"{split}-labels-idx1-ubyte.gz")
