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

With ``images=True`` (``--save-inputs-rgb``) it also writes the uint8 images of the two steps
before normalisation, so a port can tell a decoder difference from a resize difference:

- ``resized_rgb.npy``: uint8 ``[n, H, W, 3]``, the image after the squash resize
  (:func:`itae_export.images.pil_resize`), before scaling and normalising;
- ``decoded_rgb.npy``: uint8, flat, every decoded image (EXIF orientation applied, converted to
  RGB, at its own size) one after another; ``decoded_rgb_shapes.npy``: int64 ``[n, 2]`` (height,
  width) of each, so row i is ``flat[o_i : o_i + h_i * w_i * 3].reshape(h_i, w_i, 3)`` with ``o_i``
  the sum of the sizes before it.

It decodes and runs the model once more (CPU by default), one batch at a time, and streams each
array to a hidden temporary file with plain writes (no memory map: on a full disk a mapped page
kills the process with SIGBUS, a write fails with ENOSPC), so a large folder needs no more memory
than one batch. The files are renamed into place only when all are written; a failure (a full
disk, say) is one error line naming the file and leaves no temporary file behind.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from itae_export.data.outputs import collection_file, read_outputs
from itae_export.errors import InputError, OutputError
from itae_export.files import atomic_write_json, describe_os_error
from itae_export.images import ImageDecodeError, PreprocessSpec, decode_image, pil_resize, preprocess
from itae_export.onnx.contract import INPUT_NAME, OUTPUT_EMBEDDING, OUTPUT_MASK
from itae_export.onnx.manifest import read_manifest
from itae_export.runtime import open_session

PIXELS_NAME = "pixel_values.npy"
MASKS_NAME = "artifact_mask.npy"
RESIZED_NAME = "resized_rgb.npy"
DECODED_NAME = "decoded_rgb.npy"
DECODED_SHAPES_NAME = "decoded_rgb_shapes.npy"
INFO_NAME = "inputs.json"


class NpyStream:
    """A .npy file written row block by row block to a hidden temporary file beside ``path``, then
    fsynced and renamed by :meth:`commit`. ``shape=None``: a 1-D array of unknown length (the
    header is rewritten with the length at the end). Every OSError is an OutputError naming ``path``."""

    HEADER = 128  # bytes: room for any shape this module writes (numpy aligns headers to 64)

    def __init__(self, path: Path, dtype, shape: tuple | None):
        self.path, self.dtype, self.shape = Path(path), np.dtype(dtype), shape
        self.rows = 0
        self.f = None
        self.tmp = None
        try:
            fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            self.f = os.fdopen(fd, "wb")
            self.f.write(self._header(shape or (0,)))
        except OSError as e:
            self.abort()
            raise self._error(e) from None

    def _header(self, shape: tuple) -> bytes:
        d = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.lib.format.dtype_to_descr(self.dtype),
                                                                       tuple(int(x) for x in shape))
        body = self.HEADER - 10
        if len(d) >= body:
            raise OutputError(f"{self.path}: shape {shape} does not fit a {self.HEADER}-byte .npy header")
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", body) + (d.ljust(body - 1) + "\n").encode("latin1")

    def _error(self, e: OSError) -> OutputError:
        return OutputError(f"{self.path}: cannot write ({describe_os_error(e)}); nothing was written")

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if self.shape is not None and block.shape[1:] != tuple(self.shape[1:]):
            raise ValueError(f"{self.path.name}: rows of shape {block.shape[1:]}, expected {self.shape[1:]}")
        try:
            self.f.write(block.tobytes())
        except OSError as e:
            raise self._error(e) from None
        self.rows += len(block) if self.shape is not None else block.size

    def finish(self) -> None:
        """Everything on disk under the temporary name (the header holds the final length)."""
        if self.shape is not None and self.rows != self.shape[0]:
            raise OutputError(f"{self.path}: {self.rows} of {self.shape[0]} rows written")
        try:
            if self.shape is None:
                self.f.seek(0)
                self.f.write(self._header((self.rows,)))
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        except OSError as e:
            raise self._error(e) from None

    def commit(self) -> None:
        try:
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise self._error(e) from None
        self.tmp = None

    def abort(self) -> None:
        try:
            if self.f is not None and not self.f.closed:
                self.f.close()
        except OSError:
            pass
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


def _rows(out_dir: Path) -> tuple[dict, list[str]]:
    """(summary, image paths in row order) of a finished output set, checked to be one set."""
    data = read_outputs(out_dir)
    return data["summary"], [row["path"] for row in data["rows"]]


def write_inputs_and_masks(out_dir: str | os.PathLike, *, batch_size: int = 8, device: str = "cpu",
                           images: bool = False) -> dict:
    """Write pixel_values.npy, artifact_mask.npy and inputs.json into a finished itae-cluster
    output folder (rows as in embeddings.npy); with ``images``, also the uint8 decoded and resized
    images (resized_rgb.npy, decoded_rgb.npy, decoded_rgb_shapes.npy). Returns inputs.json's content."""
    out_dir = Path(out_dir)
    summary, paths = _rows(out_dir)
    root, onnx_path = Path(summary["folder"]), Path(summary["onnx"])
    manifest = read_manifest(onnx_path)
    pre_dict = manifest["preprocessing"]
    pre = PreprocessSpec.from_manifest(pre_dict)
    h, w = pre_dict["resolution"]
    n = len(paths)
    n_mask = int(manifest["num_tokens"]) - 1
    sess, provider = open_session(onnx_path, device)
    emb_path = out_dir / "embeddings.npy"
    stored = np.load(emb_path, mmap_mode="r") if emb_path.is_file() else None
    if stored is not None and len(stored) != n:
        raise InputError(f"{emb_path}: {len(stored)} rows, but assignments.csv has {n}")
    streams: dict[str, NpyStream] = {}
    try:
        streams[PIXELS_NAME] = NpyStream(out_dir / PIXELS_NAME, np.float32, (n, 3, h, w))
        streams[MASKS_NAME] = NpyStream(out_dir / MASKS_NAME, np.bool_, (n, n_mask))
        if images:
            streams[RESIZED_NAME] = NpyStream(out_dir / RESIZED_NAME, np.uint8, (n, h, w, 3))
            streams[DECODED_NAME] = NpyStream(out_dir / DECODED_NAME, np.uint8, None)
            streams[DECODED_SHAPES_NAME] = NpyStream(out_dir / DECODED_SHAPES_NAME, np.int64, (n, 2))
        max_diff, scale = 0.0, 0.0
        for i in range(0, n, batch_size):
            chunk = paths[i : i + batch_size]
            x = np.stack([_load(collection_file(root, p), pre, streams if images else None) for p in chunk])
            emb, mask = sess.run([OUTPUT_EMBEDDING, OUTPUT_MASK], {INPUT_NAME: x})
            streams[PIXELS_NAME].write(x)
            streams[MASKS_NAME].write(mask)
            if stored is not None:
                ref = np.asarray(stored[i : i + len(chunk)], np.float32)
                max_diff = max(max_diff, float(np.abs(ref - emb).max()))
                scale = max(scale, float(np.abs(ref).max()))
        for st in streams.values():
            st.finish()
        for st in streams.values():
            st.commit()
    finally:
        for st in streams.values():
            st.abort()
    info = {
        "rows": n, "order": "as embeddings.npy and assignments.csv",
        PIXELS_NAME: {"dtype": "float32", "shape": [n, 3, h, w], "preprocessing": pre_dict},
        MASKS_NAME: {"dtype": "bool", "shape": [n, n_mask],
                     "tokens": "registers first, then patches in row-major order"},
        "onnx": str(onnx_path), "execution_provider": provider,
        "embeddings_check": None if stored is None else {
            "max_abs_diff": max_diff, "rel_max_abs_diff": max_diff / (scale or 1.0)},
    }
    if images:
        info[RESIZED_NAME] = {"dtype": "uint8", "shape": [n, h, w, 3], "step": "after the squash resize, "
                              "before scaling and normalising"}
        info[DECODED_NAME] = {"dtype": "uint8", "shape": [streams[DECODED_NAME].rows],
                              "step": "decoded RGB (EXIF orientation applied), each image flattened [h, w, 3], "
                                      f"one after another; sizes in {DECODED_SHAPES_NAME} (int64 [n, 2]: h, w)"}
    try:
        atomic_write_json(out_dir / INFO_NAME, info)
    except OutputError:
        for name in streams:  # the set is not complete without its description
            (out_dir / name).unlink(missing_ok=True)
        raise
    return info


def _load(path: Path, pre: PreprocessSpec, streams: dict | None) -> np.ndarray:
    """float32 [3, H, W] of one image, as :func:`itae_export.images.load_image` computes it; with
    ``streams``, its decoded and resized uint8 images are written too."""
    try:
        img, _ = decode_image(path)
        small = pil_resize(img, pre)
        x = preprocess(small, pre)  # the size fits now: no second resize
    except ImageDecodeError as e:
        raise InputError(f"{e.path}: decoded in the run but not now ({e.reason}); was the folder changed?") from None
    except (OSError, ValueError, MemoryError) as e:
        raise InputError(f"{path}: cannot resize now ({e}); was the folder changed?") from None
    if streams is not None:
        rgb = np.asarray(img, np.uint8)
        streams[DECODED_NAME].write(rgb.reshape(-1))
        streams[DECODED_SHAPES_NAME].write(np.array([rgb.shape[:2]], np.int64))
        streams[RESIZED_NAME].write(np.asarray(small, np.uint8)[None])
    return x
