"""The model's inputs and masks beside the embeddings of an itae-cluster run (``--save-inputs``).

A porter compares a re-implementation step by step: the preprocessed tensor an image became,
the artifact mask the model returned for it, and the embedding. ``write_inputs_and_masks`` writes
the first two into the output folder of a finished run, in the row order of ``embeddings.npy``
and ``assignments.csv``:

- ``pixel_values.npy``: float32 ``[n, 3, H, W]``, exactly what the graph was fed
  (:func:`itae_export.images.load_image`, the manifest's preprocessing);
- ``artifact_mask.npy``: bool ``[n, T-1]``, the graph's ``artifact_mask`` output;
- ``inputs.json``: shapes, the model, and how far the embeddings recomputed here are from
  ``embeddings.npy`` (a check that both describe the same run).

It decodes and runs the model once more (CPU by default), one batch at a time, and writes the
arrays through memory maps, so a large folder needs no more memory than one batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from itae_export.data.outputs import read_outputs
from itae_export.errors import InputError
from itae_export.files import atomic_write_json
from itae_export.images import ImageDecodeError, load_image
from itae_export.onnx.contract import INPUT_NAME, OUTPUT_EMBEDDING, OUTPUT_MASK
from itae_export.onnx.manifest import read_manifest
from itae_export.runtime import open_session

PIXELS_NAME = "pixel_values.npy"
MASKS_NAME = "artifact_mask.npy"
INFO_NAME = "inputs.json"


def _rows(out_dir: Path) -> tuple[dict, list[str]]:
    """(summary, image paths in row order) of a finished output set, checked to be one set."""
    data = read_outputs(out_dir)
    return data["summary"], [row["path"] for row in data["rows"]]


def write_inputs_and_masks(out_dir: str | os.PathLike, *, batch_size: int = 8, device: str = "cpu") -> dict:
    """Write pixel_values.npy, artifact_mask.npy and inputs.json into a finished itae-cluster
    output folder (rows as in embeddings.npy). Returns the contents of inputs.json."""
    out_dir = Path(out_dir)
    summary, paths = _rows(out_dir)
    root, onnx_path = Path(summary["folder"]), Path(summary["onnx"])
    manifest = read_manifest(onnx_path)
    pre = manifest["preprocessing"]
    h, w = pre["resolution"]
    n_mask = int(manifest["num_tokens"]) - 1
    sess, provider = open_session(onnx_path, device)
    emb_path = out_dir / "embeddings.npy"
    stored = np.load(emb_path, mmap_mode="r") if emb_path.is_file() else None
    if stored is not None and len(stored) != len(paths):
        raise InputError(f"{emb_path}: {len(stored)} rows, but assignments.csv has {len(paths)}")
    tmp_px, tmp_mask = out_dir / f".{PIXELS_NAME}.tmp", out_dir / f".{MASKS_NAME}.tmp"
    try:
        px = np.lib.format.open_memmap(tmp_px, "w+", np.float32, (len(paths), 3, h, w))
        masks = np.lib.format.open_memmap(tmp_mask, "w+", np.bool_, (len(paths), n_mask))
        max_diff, scale = 0.0, 0.0
        for i in range(0, len(paths), batch_size):
            chunk = paths[i : i + batch_size]
            try:
                x = np.stack([load_image(root / p, pre) for p in chunk])
            except ImageDecodeError as e:
                raise InputError(f"{e.path}: decoded in the run but not now ({e.reason}); was the folder changed?") from None
            emb, mask = sess.run([OUTPUT_EMBEDDING, OUTPUT_MASK], {INPUT_NAME: x})
            px[i : i + len(chunk)] = x
            masks[i : i + len(chunk)] = mask
            if stored is not None:
                ref = np.asarray(stored[i : i + len(chunk)], np.float32)
                max_diff = max(max_diff, float(np.abs(ref - emb).max()))
                scale = max(scale, float(np.abs(ref).max()))
        px.flush()
        masks.flush()
        del px, masks
        os.replace(tmp_px, out_dir / PIXELS_NAME)
        os.replace(tmp_mask, out_dir / MASKS_NAME)
    finally:
        for t in (tmp_px, tmp_mask):
            if t.exists():
                t.unlink()
    info = {
        "rows": len(paths), "order": "as embeddings.npy and assignments.csv",
        PIXELS_NAME: {"dtype": "float32", "shape": [len(paths), 3, h, w], "preprocessing": pre},
        MASKS_NAME: {"dtype": "bool", "shape": [len(paths), n_mask],
                     "tokens": "registers first, then patches in row-major order"},
        "onnx": str(onnx_path), "execution_provider": provider,
        "embeddings_check": None if stored is None else {
            "max_abs_diff": max_diff, "rel_max_abs_diff": max_diff / (scale or 1.0)},
    }
    atomic_write_json(out_dir / INFO_NAME, info)
    return info
