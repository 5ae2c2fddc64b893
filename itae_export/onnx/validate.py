"""Run the exported graph in ONNX Runtime beside the PyTorch model and compare them."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

import numpy as np

from itae_export.cluster.metrics import kmeans_ari, l2_normalize
from itae_export.errors import OptionError
from itae_export.images import PreprocessSpec, load_images, scan_images, to_rgb
from itae_export.images import preprocess as _preprocess
from itae_export.onnx.contract import (
    FP16_MAX_MASK_MISMATCH,
    FP16_MIN_COSINE,
    FP16_REL_TOL,
    FP32_REL_TOL,
    OUTPUT_EMBEDDING,
    OUTPUT_MASK,
)
from itae_export.runtime import ort_session, run_onnx


@functools.lru_cache(maxsize=1)
def sample_photos() -> tuple[tuple[str, "object"], ...]:
    """(name, PIL image) of the photos scikit-learn and (if installed) scikit-image ship."""
    from PIL import Image

    photos = []
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    for fname, arr in zip(data.filenames, data.images):
        photos.append((f"sklearn:{Path(fname).name}", Image.fromarray(arr)))
    try:
        import skimage.data as skd
    except ImportError:
        return tuple(photos)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera"):
        try:
            photos.append((f"skimage:{name}", Image.fromarray(getattr(skd, name)())))
        except Exception:  # noqa: BLE001 - a missing sample file is not a validation failure
            continue
    return tuple(photos)


def preprocess(img, prep: dict) -> np.ndarray:
    """PIL image -> float32 [3, H, W] per the manifest, with the same code as itae-cluster."""

    return _preprocess(to_rgb(img), PreprocessSpec.from_manifest(prep))


def validation_inputs(manifest: dict, images_dir: str | os.PathLike | None = None, n_random: int = 4,
                      seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Random tensors, the bundled sample photos, and optionally a folder of images."""
    prep = manifest["preprocessing"]
    h, w = prep["resolution"]
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((3, h, w), dtype=np.float32) for _ in range(n_random)]
    names = [f"random:{i}" for i in range(n_random)]
    for name, img in sample_photos():
        xs.append(preprocess(img, prep))
        names.append(name)
    if images_dir is not None:
        root = Path(images_dir)
        if not root.is_dir():
            raise OptionError(f"--validate-images: {root} is not a folder")
        ok, arrays, _ = load_images(scan_images(root), prep)  # unreadable files are skipped, as in itae-cluster
        xs += arrays
        names += [str(p) for p in ok]
    return np.stack(xs), names


def compare(ref_emb, ref_mask, got_emb, got_mask, precision: str = "fp32") -> dict:
    """The numbers of the validation report and its verdict."""
    ref_emb = np.asarray(ref_emb, np.float64)
    got_emb = np.asarray(got_emb, np.float64)
    finite = bool(np.isfinite(got_emb).all())
    scale = float(np.abs(ref_emb).max()) or 1.0
    max_abs = float(np.abs(ref_emb - got_emb).max()) if finite else float("inf")
    cos = (ref_emb * got_emb).sum(1) / (np.linalg.norm(ref_emb, axis=1) * np.linalg.norm(got_emb, axis=1) + 1e-30)
    mismatch = int((np.asarray(ref_mask) != np.asarray(got_mask)).sum())
    total = int(np.asarray(ref_mask).size)
    report = {
        "precision": precision,
        "n_inputs": int(len(ref_emb)),
        "max_abs_diff": max_abs,
        "output_scale": scale,
        "rel_max_abs_diff": max_abs / scale,
        "min_cosine": float(cos.min()) if finite else float("nan"),
        "mask_mismatch": mismatch,
        "mask_tokens": total,
        "artifacts_per_input": [int(v) for v in np.asarray(ref_mask).sum(1)],
        "finite": finite,
    }
    k = min(4, len(ref_emb) - 1)  # independent K-Means runs on both, the same seed
    report["kmeans_ari"] = kmeans_ari(l2_normalize(ref_emb), l2_normalize(got_emb), k)[1] if finite and k >= 2 else None
    if precision == "fp32":
        tol = {"rel_max_abs_diff": FP32_REL_TOL, "mask_mismatch": 0}
        failure = None
        if not finite:
            failure = "the ONNX embedding has NaN or inf"
        elif report["rel_max_abs_diff"] > FP32_REL_TOL:
            failure = f"embedding max abs diff {max_abs:.3g} is {max_abs / scale:.3g} of the output scale (> {FP32_REL_TOL:g})"
        elif mismatch:
            failure = f"{mismatch} of {total} artifact-mask tokens differ"
    else:
        tol = {"rel_max_abs_diff": FP16_REL_TOL, "min_cosine": FP16_MIN_COSINE, "mask_mismatch_share": FP16_MAX_MASK_MISMATCH}
        failure = None
        if not finite:
            failure = "the ONNX embedding has NaN or inf"
        elif report["rel_max_abs_diff"] > FP16_REL_TOL:
            failure = f"fp16 embedding max abs diff is {max_abs / scale:.3g} of the output scale (> {FP16_REL_TOL:g})"
        elif report["min_cosine"] < FP16_MIN_COSINE:
            failure = f"fp16 min cosine {report['min_cosine']:.5f} < {FP16_MIN_COSINE}"
        elif mismatch > FP16_MAX_MASK_MISMATCH * total:
            failure = f"{mismatch} of {total} artifact-mask tokens differ (> {FP16_MAX_MASK_MISMATCH:.1%})"
    report["tolerance"] = tol
    report["passed"] = failure is None
    report["failure"] = failure
    return report


def run_torch(model, x: np.ndarray, batch_size: int = 8) -> dict[str, np.ndarray]:
    import torch

    embs, masks = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            f = model.forward_features(torch.from_numpy(x[i : i + batch_size]))
            embs.append(f["embedding"].float().numpy())
            masks.append(f["artifact_mask"].numpy())
    return {OUTPUT_EMBEDDING: np.concatenate(embs), OUTPUT_MASK: np.concatenate(masks)}


def torch_reference(model, manifest: dict, images_dir=None) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """(inputs, their names, the PyTorch outputs): what :func:`validate_model` compares against."""
    x, names = validation_inputs(manifest, images_dir)
    return x, names, run_torch(model, x)


def validate_model(onnx_path, model, manifest: dict, *, images_dir=None, log: Callable[[str], None] = lambda m: None,
                   batch_sizes: tuple[int, ...] = (1, 3), reference=None) -> dict:
    """Compare ONNX Runtime with the PyTorch ITAE model; the report also says which inputs were used.
    ``reference``: a :func:`torch_reference` already computed for this model and manifest."""
    x, names, ref = reference or torch_reference(model, manifest, images_dir)
    sess = ort_session(onnx_path)
    report = None
    per_batch = {}
    for bs in batch_sizes:
        got = run_onnx(sess, x, batch_size=bs)
        r = compare(ref[OUTPUT_EMBEDDING], ref[OUTPUT_MASK], got[OUTPUT_EMBEDDING], got[OUTPUT_MASK], manifest["precision"])
        per_batch[str(bs)] = {k: r[k] for k in ("max_abs_diff", "min_cosine", "mask_mismatch", "passed")}
        if report is None or not r["passed"]:
            report = r
        if not r["passed"]:
            break
    report["batch_sizes"] = per_batch
    report["inputs"] = names
    log(format_report(report))
    return report


def format_report(r: dict) -> str:
    if r.get("skipped"):
        return "validation: skipped"
    ari = "n/a" if r.get("kmeans_ari") is None else f"{r['kmeans_ari']:.3f}"
    verdict = "PASSED" if r["passed"] else f"FAILED ({r['failure']})"
    return (
        f"validation {verdict}: {r['n_inputs']} inputs, embedding max abs diff {r['max_abs_diff']:.3g} "
        f"({r['rel_max_abs_diff']:.3g} of scale), min cosine {r['min_cosine']:.6f}, "
        f"mask tokens differing {r['mask_mismatch']}/{r['mask_tokens']}, K-Means ARI {ari}"
    )
