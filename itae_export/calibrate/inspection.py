"""Look inside a model on real images: the last block's norm histogram (paper Fig. 2), a suggested
theta, and CLS attention maps with and without ITAE (paper Fig. 4).

The norms come from the PyTorch model (they do not depend on theta, and the exported graph does not
output them). The attention maps come from the ``cls_attention`` output of two exported ONNX
models (``attention_output=True``), one with ITAE and one without, run in ONNX Runtime on CPU: the
picture shows what the exported model does. ``attention_backend="torch"`` takes them from the same
PyTorch model instead (no export, much faster; same math, checked by the exporter's validation).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import Callable

import numpy as np

from itae_export.calibrate.theta import suggest_theta
from itae_export.cluster.artifacts import artifact_stats, counts_from_masks
from itae_export.data.embed import load_item
from itae_export.data.sources import Item, open_source, text_key
from itae_export.errors import InputError, OptionError
from itae_export.files import atomic_write_json, check_writable, ensure_dir
from itae_export.images import DEFAULT_MAX_PIXELS, PreprocessSpec, sample_evenly, scan_images
from itae_export.model import ops
from itae_export.model.itae import inject_itae
from itae_export.model.vit import build_model, init_random_
from itae_export.onnx.export import export_onnx, model_from_manifest, options_from_manifest, spec_from_manifest
from itae_export.plots import plot_attention, plot_norm_histogram
from itae_export.registry import GROUP_CODES, ITAEOptions, ModelSpec, get_model_spec
from itae_export.runtime import ort_session
from itae_export.weights import checkpoints

HIST_NAME = "norms_hist.png"
ATTENTION_NAME = "attention.png"
JSON_NAME = "inspect.json"
INSPECT_SOURCES = ("query", "key", "value")
ATTENTION_BACKENDS = ("onnx", "torch")


@dataclass
class NormSample:
    """Last-block projection norms of the candidate tokens (registers first, then patches)."""

    paths: list[str]  # the keys of the images (relative to the folder; list entries; <tar>/<sample>)
    norms: np.ndarray  # [n_images, R + N] float32
    num_register_tokens: int
    grid: tuple[int, int]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of the images that did not decode
    items: list[Item] = field(default_factory=list)  # the images of ``paths``, to decode them again


@dataclass
class InspectModel:
    model: object  # VisionTransformer with ITAE injected (enabled) at ``options``
    spec: ModelSpec
    options: ITAEOptions
    weights: str  # description for the JSON and the titles


def artifact_mask_np(norms: np.ndarray, theta: float, group: str = "minority") -> np.ndarray:
    """The artifact mask of each image (rows of ``norms``), computed by the ITAE op's own Eq. 3-4."""
    import torch

    return ops.mask_from_norms(torch.from_numpy(np.asarray(norms)), float(theta), GROUP_CODES[group]).numpy()


def per_image_summary(mask: np.ndarray, num_register_tokens: int) -> dict:
    """Artifact counts per image: mean, median, min, max, images with any, registers among them."""
    counts = mask.sum(1)
    R = num_register_tokens
    return {
        "mean": float(counts.mean()) if counts.size else 0.0,
        "median": float(np.median(counts)) if counts.size else 0.0,
        "min": int(counts.min()) if counts.size else 0,
        "max": int(counts.max()) if counts.size else 0,
        "images_with_artifacts": int((counts > 0).sum()),
        "images": int(counts.size),
        "register_tokens_flagged": int(mask[:, :R].sum()) if R else 0,
        "patch_tokens_flagged": int(mask[:, R:].sum()),
        "count_histogram": {int(c): int(n) for c, n in zip(*np.unique(counts, return_counts=True))},
    }


# ---------------------------------------------------------------- model and images


def load_inspect_model(model: str | ModelSpec, *, weights: str | None = None, random_weights: bool = False,
                       source: str = "query", theta: float | None = None, seed: int = 0) -> InspectModel:
    """The PyTorch model with ITAE enabled (so that its forward returns the norms).

    ``random_weights`` builds the architecture with random weights: for demos and tests only,
    and only when asked for explicitly; otherwise :func:`itae_export.weights.checkpoints.load_model` loads
    ``weights`` (or the official checkpoint).
    """
    spec = get_model_spec(model) if isinstance(model, str) else model
    if source not in INSPECT_SOURCES:
        raise OptionError(f"--source: {source!r} is not one of {', '.join(INSPECT_SOURCES)}")
    options = ITAEOptions.for_model(spec, theta=theta, source=source)
    if random_weights:
        if weights is not None:
            raise OptionError("--random-weights and --weights exclude each other")

        m = init_random_(build_model(spec, options), seed=seed)
        desc = f"random weights (seed {seed})"
    else:
        m, loaded = checkpoints.load_model(spec, options, weights=weights)
        desc = f"{loaded.source} ({loaded.format})"
    return InspectModel(m.eval(), spec, options, desc)


def pick_images(folder: str | os.PathLike, max_images: int | None) -> tuple[Path, list[Path]]:
    """Every image under ``folder``, or ``max_images`` of them evenly spaced over the sorted scan."""

    root = Path(folder).resolve()  # the names below are relative to it, links inside kept as found
    paths = scan_images(root)
    if not paths:
        raise InputError(f"{folder}: no images found")
    if max_images is not None and max_images < 1:
        raise OptionError(f"--max-images: {max_images} must be >= 1")
    return root, sample_evenly(paths, max_images)


def pick_items(spec: str | os.PathLike, max_images: int | None, exclude: Path | None = None) -> tuple[str, list[Item]]:
    """(location, items) of any input of the source layer (a folder, a path list, WebDataset tars):
    every image, or ``max_images`` of them evenly spaced over the source's order. ``exclude``: a
    folder never scanned (the output)."""
    if max_images is not None and max_images < 1:
        raise OptionError(f"--max-images: {max_images} must be >= 1")
    src = open_source(spec, exclude=exclude)
    return src.location, sample_evenly([it for part in src.parts for it in part.items()], max_images)


def as_items(root: Path, paths: list) -> list[Item]:
    """Items of ``paths`` (files under ``root``, keyed by their relative POSIX path; Items pass through)."""
    out = []
    for i, p in enumerate(paths):
        if isinstance(p, Item):
            out.append(p)
            continue
        a = Path(os.path.abspath(p))  # a link may point outside: the name it was found at
        out.append(Item(i, a.relative_to(root).as_posix() if a.is_relative_to(root) else str(a), str(a)))
    return out


def _load_batch(items: list[Item], preprocessing: dict, max_pixels: int | None):
    """The decode of every command (:func:`itae_export.data.embed.load_item`): (items that decoded,
    their pixels, (key, reason) of the rest)."""
    pre = PreprocessSpec.from_manifest(preprocessing)
    ok, arrays, bad = [], [], []
    for it in items:
        px, reason, _ = load_item(it, pre, max_pixels)
        if px is None:
            bad.append((it.key, reason))
        else:
            ok.append(it)
            arrays.append(px)
    return ok, arrays, bad


def compute_norms(im: InspectModel, root: Path, paths: list, *, batch_size: int = 8,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> NormSample:
    """Run the PyTorch model over the images (files under ``root`` or :class:`Item` of any source);
    keep the last block's projection norms. Images that do not decode are in ``skipped``."""
    import torch

    items = as_items(root, paths)
    pre = im.spec.preprocessing.to_dict()
    good, chunks, skipped = [], [], []
    for i in range(0, len(items), batch_size):
        ok, arrays, bad = _load_batch(items[i: i + batch_size], pre, max_pixels)
        skipped += bad
        if not arrays:
            continue
        with torch.no_grad():
            f = im.model.forward_features(torch.from_numpy(np.stack(arrays)))
        chunks.append(f["norms"].float().numpy())
        good += ok
    if not chunks:
        first = f"; {text_key(skipped[0][0])}: {skipped[0][1]}" if skipped else ""
        raise InputError(f"{text_key(str(root))}: none of the {len(items)} images could be decoded{first}")
    res = im.spec.preprocessing.resolution
    g = res // im.spec.arch.patch_size
    return NormSample([it.key for it in good], np.concatenate(chunks), im.spec.arch.num_register_tokens, (g, g),
                      im.options.source, skipped, good)


# ---------------------------------------------------------------- pictures


@dataclass
class AttentionMaps:
    """CLS attention of the last block, averaged over heads, for a few images."""

    paths: list[str]
    original: np.ndarray  # [n, T] (CLS column included)
    itae: np.ndarray  # [n, T]
    artifact_mask: np.ndarray  # [n, T-1] from the ITAE model
    backend: str
    images: list = field(default_factory=list)  # RGB uint8 arrays at the model resolution


def run_attention_onnx(onnx_path: str | os.PathLike, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cls_attention [B,H,T], artifact_mask [B,T-1]) of an exported model with the cls_attention output."""
    sess = ort_session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    if "cls_attention" not in names:
        raise InputError(f"{onnx_path}: the exported model has no cls_attention output (export it with "
                         f"attention_output=True); outputs: {names}")
    mask, att = sess.run(["artifact_mask", "cls_attention"], {"pixel_values": x})
    return np.asarray(att, np.float32), np.asarray(mask, bool)


def export_attention_pair(im: InspectModel, out_dir: str | os.PathLike, *, validate: bool = True,
                          log: Callable[[str], None] = lambda m: None) -> tuple[Path, Path]:
    """Export the unpatched and the ITAE model, both with the cls_attention output: (original, itae) paths."""

    out_dir = Path(out_dir)
    paths = []
    no_itae = ITAEOptions.for_model(im.spec, theta=im.options.theta, source=im.options.source, enabled=False)
    for tag, opts in (("noitae", no_itae), ("itae", im.options)):
        log(f"exporting the {'ITAE' if tag == 'itae' else 'unpatched'} model with the cls_attention output ...")
        res = export_onnx(im.spec, opts, out_dir / f"{im.spec.name}_{opts.slug()}_attention.onnx",
                          model=copy.deepcopy(im.model), attention_output=True, validate=validate)
        paths.append(res.path)
    return paths[0], paths[1]


def _torch_attention(im: InspectModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch


    model = copy.deepcopy(im.model)
    with torch.no_grad():
        f = model.forward_features(torch.from_numpy(x))
        att_itae, mask = f["cls_attention"].float().numpy(), f["artifact_mask"].numpy()
        inject_itae(model, ITAEOptions.for_model(im.spec, theta=im.options.theta, enabled=False))
        att_orig = model.forward_features(torch.from_numpy(x))["cls_attention"].float().numpy()
    return att_orig, att_itae, mask


def attention_maps(im: InspectModel, root: Path, paths: list, *, backend: str = "onnx", validate: bool = True,
                   exported: tuple[str | os.PathLike, str | os.PathLike] | None = None,
                   log: Callable[[str], None] = lambda m: None,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> AttentionMaps:
    """CLS attention (mean over heads) of the original and the ITAE model for ``paths``.

    onnx backend: ``exported`` names two models from :func:`export_attention_pair` (original, ITAE);
    without it both are exported into a temporary folder, checked against PyTorch when ``validate``.
    """
    from PIL import Image


    if backend not in ATTENTION_BACKENDS:
        raise OptionError(f"--attention-backend: {backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    ok, arrays, _ = _load_batch(as_items(root, paths), im.spec.preprocessing.to_dict(), max_pixels)
    if not arrays:
        raise InputError("no image for the attention maps could be decoded")
    x = np.stack(arrays).astype(np.float32)
    res = im.spec.preprocessing.resolution
    rgb = []
    for it in ok:
        img, _ = it.decode(max_pixels)
        rgb.append(np.asarray(img.resize((res, res), Image.BICUBIC)))
    if backend == "onnx":
        work = None
        try:
            if exported is None:
                work = Path(tempfile.mkdtemp(prefix="itae-inspect-"))
                exported = export_attention_pair(im, work, validate=validate, log=log)
            orig, _ = run_attention_onnx(exported[0], x)
            itae, mask = run_attention_onnx(exported[1], x)
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
    else:
        orig, itae, mask = _torch_attention(im, x)
    return AttentionMaps([it.key for it in ok], orig.mean(1), itae.mean(1), mask, backend, rgb)


# ---------------------------------------------------------------- the job


def default_inspect_dir(spec: str | os.PathLike) -> Path:
    """``photos/`` -> ``photos_inspect/`` beside it (``photos.tar`` -> ``photos_inspect/``, ``list.txt`` ->
    ``list_inspect/``)."""
    p = Path(os.path.abspath(spec))
    return p.with_name((p.name if p.is_dir() else p.stem) + "_inspect")


def inspect_folder(folder: str | os.PathLike, model: str | ModelSpec, *, weights: str | None = None,
                   random_weights: bool = False, source: str = "query", theta: float | None = None,
                   max_images: int | None = 64, out_dir: str | os.PathLike | None = None, attention: bool = False,
                   attention_images: int = 4, attention_backend: str = "onnx", batch_size: int = 8, seed: int = 0,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS, log: Callable[[str], None] = lambda m: None) -> dict:
    """Norm histogram, suggested theta and (optionally) attention maps for the images of ``folder``:
    any input of :func:`itae_export.data.sources.open_source` (a folder, a path list, WebDataset
    tars), decoded like every other command (:func:`itae_export.data.embed.load_item`, ``max_pixels``).

    Writes ``norms_hist.png``, ``inspect.json`` and, with ``attention``, ``attention.png`` into
    ``out_dir`` (default ``<folder>_inspect/``); returns the JSON dictionary. Images that do not
    decode are listed with their reason under ``skipped``.
    """

    out = Path(out_dir) if out_dir is not None else default_inspect_dir(folder)
    check_writable(out, "--out", folder=True)  # a bad --out fails before any work
    location, items = pick_items(folder, max_images, exclude=out)
    root = Path(location)
    ensure_dir(out, "--out")  # what check_writable cannot see (/proc) fails here, still before the work
    im = load_inspect_model(model, weights=weights, random_weights=random_weights, source=source, theta=theta,
                            seed=seed)
    log(f"{im.spec.name}: {im.weights}; {len(items)} images")
    sample = compute_norms(im, root, items, batch_size=batch_size, max_pixels=max_pixels)
    sug = suggest_theta(sample.norms)
    cur = im.options.theta
    result = _norms_record(im, sample, sug, root, random_weights, source)
    title = (f"{im.spec.name} ({'random weights' if random_weights else Path(im.weights.split(' ')[0]).name}), "
             f"{len(sample.paths)} images from {root.name}")
    plot_norm_histogram(sample, out / HIST_NAME, theta=cur, suggestion=sug, title=title)
    result["files"]["histogram"] = HIST_NAME
    if attention:
        n_att = max(1, min(attention_images, len(sample.items)))
        maps = attention_maps(im, root, sample_evenly(sample.items, n_att), backend=attention_backend, log=log,
                              max_pixels=max_pixels)
        plot_attention(maps, out / ATTENTION_NAME, num_register_tokens=sample.num_register_tokens, grid=sample.grid,
                       title=f"{im.spec.name}: CLS attention of the last block, mean over heads "
                             f"(theta {cur:g}, {maps.backend})")
        result["attention"] = _attention_record(maps, sample.num_register_tokens)
        result["files"]["attention"] = ATTENTION_NAME
    atomic_write_json(out / JSON_NAME, result)
    result["out_dir"] = str(out.resolve())
    return result


def _norms_record(im: InspectModel, sample: NormSample, sug, root: Path, random_weights: bool, source: str) -> dict:
    """inspect.json without its pictures: the norms, the suggestion, the artifact counts."""
    cur = im.options.theta
    flat = sample.norms.ravel()
    return {
        "model": im.spec.name,
        "weights": im.weights,
        "random_weights": bool(random_weights),
        "source": source,
        "folder": str(root),
        "images": len(sample.paths),
        "skipped": [{"path": text_key(p), "reason": r} for p, r in sample.skipped],
        "tokens_per_image": int(sample.norms.shape[1]),
        "num_register_tokens": sample.num_register_tokens,
        "current_theta": cur,
        "current_theta_note": im.spec.theta_note or None,
        "suggested_theta": sug.theta,
        "confidence": sug.confidence,
        "bimodal": sug.bimodal,
        "warning": sug.warning,
        "method": sug.method,
        "suggestion_stats": sug.stats,
        "counts": {
            "current": {"below": int((flat <= cur).sum()), "above": int((flat > cur).sum())},
            "suggested": {"below": int((flat <= sug.theta).sum()), "above": int((flat > sug.theta).sum())},
        },
        "artifacts": artifact_stats(counts_from_masks(artifact_mask_np(sample.norms, cur)), sample.norms.shape[1],
                                    theta=cur),
        "per_image_artifacts": {
            "current": per_image_summary(artifact_mask_np(sample.norms, cur), sample.num_register_tokens),
            "suggested": per_image_summary(artifact_mask_np(sample.norms, sug.theta), sample.num_register_tokens),
        },
        "files": {},
    }


def _attention_record(maps: AttentionMaps, R: int) -> dict:
    """The attention part of inspect.json: CLS attention on the artifacts and on the registers."""
    return {
        "backend": maps.backend,
        "source": ("cls_attention output of exported ONNX models (ITAE and --no-itae), ONNX Runtime CPU"
                   if maps.backend == "onnx" else "cls_attention of the PyTorch model (ITAE and disabled)"),
        "images": [text_key(p) for p in maps.paths],
        "attention_on_artifacts": {
            "original": [float(a[1:][m].sum()) for a, m in zip(maps.original, maps.artifact_mask)],
            "itae": [float(a[1:][m].sum()) for a, m in zip(maps.itae, maps.artifact_mask)],
        },
        "attention_on_registers": {
            "original": [float(a[1:1 + R].sum()) for a in maps.original],
            "itae": [float(a[1:1 + R].sum()) for a in maps.itae],
        },
    }


def run_items(root: Path, keys: list[str], out_dir: Path | None = None) -> list[Item]:
    """The items of a run's ``keys`` (summary.json's ``folder`` as ``root``): files under the folder
    (or a list's folder), else the members of the tars the run read (``root``: a tar, a folder of
    tars or a brace pattern), found by key through the source layer."""
    root = Path(root)
    if root.is_dir() and all((root / k).is_file() for k in keys):
        return as_items(root, [root / k for k in keys])
    by_key = {it.key: it for part in open_source(root, exclude=out_dir).parts for it in part.items()}
    return [by_key[k] if k in by_key else Item(i, k, str(root / k)) for i, k in enumerate(keys)]


def inspect_run(manifest: dict, onnx_path, root: Path, rel_paths: list[str], out_dir: Path, *,
                flagged: list[str] | None = None, max_images: int = 64, n_maps: int = 4,
                hist_name: str = HIST_NAME, attention_name: str = ATTENTION_NAME) -> dict:
    """The pictures of an itae-cluster run: the norm histogram of (up to ``max_images``, evenly
    spaced) of its own images with its theta, and the CLS attention maps with and without ITAE of
    its most-flagged images (``flagged``, else the most-flagged of the sample). Needs the weights
    the graph was exported from (CheckpointError otherwise)."""
    spec = spec_from_manifest(manifest)
    options = options_from_manifest(manifest)
    if not options.enabled:
        options = dataclasses_replace(options, enabled=True)  # the norms exist only with ITAE injected
    model = model_from_manifest(manifest, onnx_path)
    inject_itae(model, options)
    im = InspectModel(model, spec, options, str(manifest.get("weights", {}).get("source")))
    sample = compute_norms(im, root, run_items(root, sample_evenly(rel_paths, max_images), out_dir))
    sug = suggest_theta(sample.norms) if sample.norms.size >= 20 else None
    plot_norm_histogram(sample, out_dir / hist_name, theta=options.theta, suggestion=sug,
                        title=f"{spec.name}: {sample.source} norms of {len(sample.paths)} of the run's images")
    mask = artifact_mask_np(sample.norms, options.theta, options.group)
    if not flagged:
        counts = mask.sum(1)
        flagged = [sample.paths[i] for i in np.argsort(-counts, kind="stable")[:n_maps] if counts[i] > 0]
    record = {"images": len(sample.paths), "histogram": hist_name,
              "suggestion": None if sug is None else {"theta": sug.theta, "confidence": sug.confidence,
                                                      "bimodal": sug.bimodal},
              "artifacts": artifact_stats(counts_from_masks(mask), mask.shape[1], theta=options.theta)}
    if flagged:
        maps = attention_maps(im, root, run_items(root, flagged[:n_maps], out_dir), backend="torch")
        plot_attention(maps, out_dir / attention_name, num_register_tokens=sample.num_register_tokens,
                       grid=sample.grid, title=f"the most-flagged images: CLS attention without and with ITAE "
                                               f"(theta {options.theta:g})")
        record.update(attention=attention_name, attention_images=maps.paths)
    return record


def format_result(result: dict) -> str:
    """The lines the CLI prints on stderr."""
    lines = [
        f"{result['model']} ({result['weights']}), {result['images']} images, {result['source']} norms",
        f"suggested theta {result['suggested_theta']:.3g} (confidence {result['confidence']:.2f}, "
        f"{'bimodal' if result['bimodal'] else 'NOT bimodal'}); current theta {result['current_theta']:g}",
    ]
    c = result["per_image_artifacts"]["current"]
    lines.append(f"artifacts per image at the current theta: mean {c['mean']:.2f}, max {c['max']}, "
                 f"{c['images_with_artifacts']}/{c['images']} images with any")
    if result.get("artifacts", {}).get("warning"):
        lines.append(result["artifacts"]["warning"])
    if result["skipped"]:
        lines.append(f"skipped {len(result['skipped'])} images that could not be read:")
        lines += [f"  {s['path']}: {s['reason']}" for s in result["skipped"]]
    lines.append("outputs: " + ", ".join(str(Path(result["out_dir"]) / f) for f in result["files"].values()))
    return "\n".join(lines)


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2)
