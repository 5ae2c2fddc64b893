"""Embedding a folder with an exported model: scan once, reuse stored vectors, decode in a worker
pool a few batches ahead of inference, commit one batch at a time (an interrupted run loses at
most one batch), skip bad images with a reason."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from itae_export.data.store import EmbeddingStore, file_key
from itae_export.onnx.identity import model_fingerprint
from itae_export.errors import InputError, OptionError
from itae_export.images import DEFAULT_MAX_PIXELS, PreprocessSpec, scan_images, try_load_image
from itae_export.onnx.manifest import read_manifest
from itae_export.runtime import Embedder, available_cores, open_session

POOLS = ("thread", "process")


@dataclass
class EmbedResult:
    """Embeddings of the images that decoded, in scan order, and the ones that did not."""

    root: Path
    paths: list[str]  # relative POSIX paths, scan order
    embeddings: np.ndarray  # [n, D] float32, as the model outputs them (not L2-normalised)
    skipped: list[tuple[str, str]]  # (relative path, reason)
    n_found: int
    n_new: int
    n_reused: int
    provider: str
    model_id: str
    embed_seconds: float
    batch_size: int  # as resolved (the defaults depend on the provider)
    workers: int
    conversions: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.n_new / self.embed_seconds if self.embed_seconds > 0 and self.n_new else 0.0


def default_out_dir(folder: str | os.PathLike) -> Path:
    """``photos/`` -> ``photos_itae/`` beside it."""
    folder = Path(folder).resolve()
    return folder.with_name(folder.name + "_itae")


def default_workers(provider: str | None = None) -> int:
    """Decode threads: leave a core to ONNX Runtime on CPU; on a GPU, decoding is the bottleneck."""
    cores = available_cores()
    if provider == "CUDAExecutionProvider":
        return max(1, min(16, cores - 1))
    return max(1, min(4, cores - 1))


def default_batch_size(provider: str | None = None) -> int:
    """8 on CPU; 128 on a GPU, where larger batches keep the device busy.

    On the 2-core AVX2 machine of docs/performance.md, ViT-S/14 runs about 30% more images/s at
    batch 8 than at 32 (the activations of 8 images stay in cache): 7.5 against 5.9 images/s end to
    end in bench/bench_cluster.py."""
    return 128 if provider == "CUDAExecutionProvider" else 8


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


@dataclass
class FolderScan:
    """The images of a folder, scanned once: absolute paths (symlinks kept: an image's key is the
    path it was found at) and their relative POSIX names, in scan order."""

    root: Path
    paths: list[Path]
    rel: list[str]

    @classmethod
    def of(cls, folder: str | os.PathLike, paths: list | None = None, exclude=()) -> "FolderScan":
        """Every image under ``folder`` (or the given ``paths``), without those at or under ``exclude``."""
        root = Path(os.path.abspath(folder))
        found = scan_images(root) if paths is None else paths
        if exclude:
            out = set(exclude)
            found = [p for p in found if not ({Path(p).resolve(), *Path(p).resolve().parents} & out)]
        abs_paths = [Path(os.path.abspath(p)) for p in found]
        rel = []
        for p in abs_paths:
            try:
                rel.append(p.relative_to(root).as_posix())
            except ValueError:
                raise InputError(f"{p}: not inside the folder {root}") from None
        return cls(root, abs_paths, rel)


def embed_folder(folder: str | os.PathLike, onnx_path: str | os.PathLike, *, paths: list[Path] | None = None,
                 scan: FolderScan | None = None, manifest: dict | None = None, store=None,
                 batch_size: int | None = None, workers: int | None = None, pool: str = "thread",
                 device: str = "auto", intra_op_threads: int | None = None, progress: bool = True,
                 session=None, model_id: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 log: Callable[[str], None] | None = None) -> EmbedResult:
    """Embed every image under ``folder`` (or the given ``paths``, or an existing ``scan``) with an
    exported model.

    Rows found in ``store`` (an EmbeddingStore or a path to one) for this model and the same file
    size and mtime are reused; new rows are committed to it one batch at a time, so an
    interrupted run loses at most one batch. Bad images are skipped with a reason, never fatal.
    ``session`` is an optional :class:`itae_export.runtime.Session`; ``manifest`` and ``model_id``
    (the model's :func:`~itae_export.onnx.identity.model_fingerprint`) when the caller has them.
    """
    if batch_size is not None and batch_size < 1:
        raise OptionError(f"--batch-size: {batch_size} must be >= 1")
    if pool not in POOLS:
        raise OptionError(f"--pool: {pool!r} is not one of {', '.join(POOLS)}")
    if workers is not None and workers < 1:
        raise OptionError(f"--workers: {workers} must be >= 1")
    scan = scan or FolderScan.of(folder, paths)
    root, paths, rel = scan.root, scan.paths, scan.rel
    manifest = manifest or read_manifest(onnx_path)
    pre = PreprocessSpec.from_manifest(manifest.get("preprocessing"))

    own_store = store is not None and not isinstance(store, EmbeddingStore)
    if own_store:
        store = EmbeddingStore(store)
    try:
        sess, provider = session if session is not None else open_session(
            onnx_path, device, intra_op_threads=intra_op_threads, spinning=False)
        embed = Embedder(sess, provider)
        batch_size = batch_size or default_batch_size(provider)
        workers = workers or default_workers(provider)
        model_id = model_id or model_fingerprint(onnx_path, cache=store)

        t0 = time.perf_counter()
        keys, skipped = _file_keys(rel, paths)
        done = store.lookup(model_id, keys) if store is not None else {}
        todo = [(r, p) for r, p in zip(rel, paths) if r in keys and r not in done]
        n_reused = len(done)
        conversions: Counter = Counter()
        new_vecs: dict[str, np.ndarray] = {}
        if log and n_reused:
            log(f"Reusing {n_reused} stored embeddings; {len(todo)} images to embed")

        if todo:
            _run_pipeline(todo, pre, max_pixels, embed, store, model_id, keys, batch_size, workers, pool, progress,
                          new_vecs, skipped, conversions)
        embed_seconds = time.perf_counter() - t0
    finally:
        if own_store:
            store.close()

    good, emb = _in_scan_order(rel, {**done, **new_vecs}, int(manifest.get("embed_dim") or 0))
    return EmbedResult(
        root=root, paths=good, embeddings=emb,
        skipped=[(r, skipped[r]) for r in rel if r in skipped],
        n_found=len(rel), n_new=len(new_vecs), n_reused=n_reused, provider=provider, model_id=model_id,
        embed_seconds=embed_seconds, batch_size=batch_size, workers=workers, conversions=dict(conversions),
    )


def _file_keys(rel: list[str], paths: list[Path]) -> tuple[dict[str, tuple[int, int, int]], dict[str, str]]:
    """(the store key of each file that can be stat'ed, reason for each that cannot)."""
    keys, skipped = {}, {}
    for r, p in zip(rel, paths):
        try:
            keys[r] = file_key(p)
        except OSError as e:
            skipped[r] = f"cannot stat: {e.strerror or e}"
    return keys, skipped


def _in_scan_order(rel: list[str], vectors: dict, dim: int) -> tuple[list[str], np.ndarray]:
    """(the names that have a vector, in scan order; their vectors as float32 [n, D])."""
    good = [r for r in rel if r in vectors]
    if vectors:
        dim = next(iter(vectors.values())).shape[0]
    emb = np.stack([vectors[r] for r in good]).astype(np.float32) if good else np.zeros((0, dim), np.float32)
    return good, emb


def _run_pipeline(todo, pre, max_pixels, embed, store, model_id, keys, batch_size, workers, pool, progress,
                  new_vecs, skipped, conversions) -> None:
    """Decode in a worker pool, a few batches ahead, while the main thread runs inference."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    if pool == "process":
        import multiprocessing as mp

        ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_ignore_sigint)
    else:
        ex = ThreadPoolExecutor(workers, thread_name_prefix="itae-decode")
    ahead = 2 * batch_size + workers  # enough to hide decoding, little memory
    pending: deque = deque()
    it = iter(todo)
    bar = progress_bar(len(todo), progress, "embedding")
    try:
        def fill() -> None:
            while len(pending) < ahead:
                nxt = next(it, None)
                if nxt is None:
                    return
                pending.append((nxt[0], ex.submit(try_load_image, str(nxt[1]), pre, max_pixels)))

        fill()
        while pending:
            batch_rel, batch_px = [], []
            while pending and len(batch_rel) < batch_size:
                r, fut = pending.popleft()
                px, reason, notes = fut.result()
                fill()
                if px is None:
                    skipped[r] = reason
                    bar.update(1)
                    continue
                conversions.update(notes)
                batch_rel.append(r)
                batch_px.append(px)
            if not batch_rel:
                continue
            vecs = embed(np.stack(batch_px))
            finite = np.isfinite(vecs).all(axis=1)  # a NaN vector would poison K-Means: never stored
            for r in (r for r, ok in zip(batch_rel, finite) if not ok):
                skipped[r] = "the model returned NaN or inf for this image"
            good_rel, vecs = [r for r, ok in zip(batch_rel, finite) if ok], vecs[finite]
            if store is not None and good_rel:
                store.add(model_id, [(r, *keys[r]) for r in good_rel], vecs)
            for r, v in zip(good_rel, vecs):
                new_vecs[r] = v
            bar.update(len(batch_rel))
    finally:
        bar.close()
        ex.shutdown(wait=True, cancel_futures=True)
