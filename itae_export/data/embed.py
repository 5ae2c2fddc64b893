"""Embedding images (a folder's files, a list's, tar members: any :class:`~itae_export.data.sources.Item`)
with an exported model: reuse the vectors of the shared embedding store, decode in a worker pool a
few batches ahead of inference, commit one batch at a time (an interrupted run loses at most one
batch), skip bad images with a reason."""

from __future__ import annotations

import os
import posixpath
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from itae_export.data.sources import OTHER_IMAGE_EXTENSIONS, SCAN_EXTENSIONS, Item, open_source, text_key
from itae_export.data.store import EmbeddingStore, extra_model_id, file_key, source_key
from itae_export.errors import InputError, OptionError
from itae_export.images import DEFAULT_MAX_PIXELS, ImageDecodeError, PreprocessSpec, preprocess, scan_images
from itae_export.onnx.contract import OUTPUT_EMBEDDING, OUTPUT_MASK
from itae_export.onnx.identity import model_fingerprint
from itae_export.onnx.manifest import read_manifest
from itae_export.runtime import Embedder, available_cores, open_session

POOLS = ("thread", "process")
NON_FINITE = "the model returned NaN or inf for this image"  # the skip reason of a non-finite vector


@dataclass
class EmbedResult:
    """Embeddings of the images that decoded, in input order, and the ones that did not."""

    root: Path
    paths: list[str]  # the keys (relative POSIX paths of a folder; list entries; <tar>/<sample>), input order
    embeddings: np.ndarray  # [n, D] float32, as the model outputs them (not L2-normalised)
    skipped: list[tuple[str, str]]  # (key, reason)
    n_found: int
    n_new: int
    n_reused: int
    provider: str
    model_id: str
    embed_seconds: float
    batch_size: int  # as resolved (the defaults depend on the provider)
    workers: int
    conversions: dict[str, int] = field(default_factory=dict)
    # per image, aligned with ``paths``: True entries of the graph's artifact_mask row (-1: no such output)
    artifact_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # {graph output: [n, ...] float32}, aligned

    @property
    def keys(self) -> list[str]:
        return self.paths

    @property
    def images_per_s(self) -> float:
        return self.n_new / self.embed_seconds if self.embed_seconds > 0 and self.n_new else 0.0


def default_out_dir(folder: str | os.PathLike) -> Path:
    """``photos/`` -> ``photos_itae/`` beside it (``photos.tar`` and ``list.txt``: ``photos_itae/``, ``list_itae/``)."""
    folder = Path(folder).resolve()
    return folder.with_name((folder.name if folder.is_dir() else folder.stem) + "_itae")


def default_workers(provider: str | None = None) -> int:
    """Decode threads: leave a core to ONNX Runtime on CPU; on a GPU, decoding is the bottleneck."""
    cores = available_cores()
    if provider == "CUDAExecutionProvider":
        return max(1, min(16, cores - 1))
    return max(1, min(4, cores - 1))


MAX_THREADS_PER_CORE = 4  # decode threads beyond this only wait for the cores (a little I/O latency hidden)


def decode_workers(requested: int | None, pool: str = "thread", log: Callable[[str], None] | None = None
                   ) -> int | None:
    """``--workers`` capped: a decode process per core at most, ``MAX_THREADS_PER_CORE`` threads per core.
    The pools start a worker per queued image up to the limit, so ``--workers 100000 --pool process``
    spawned a Python process per image; ``log`` says when it caps. None stays None (the default)."""
    if requested is None:
        return None
    cores = available_cores()
    limit = cores if pool == "process" else MAX_THREADS_PER_CORE * cores
    if requested > limit:
        if log:
            log(f"--workers {requested}: at most {limit} decode {'processes' if pool == 'process' else 'threads'} "
                f"for the {cores} cores this process may use; using {limit}")
        return limit
    return requested


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
        found = scan_images(root, SCAN_EXTENSIONS) if paths is None else paths
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

    def items(self) -> list[Item]:
        return [Item(i, r, str(p)) for i, (r, p) in enumerate(zip(self.rel, self.paths))]


def load_item(item: Item, pre: PreprocessSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """(pixels [3,H,W] or None, skip reason or None, conversion notes): never raises for one bad image."""
    try:
        img, notes = item.decode(max_pixels)
        return preprocess(img, pre), None, notes
    except ImageDecodeError as e:
        ext = os.path.splitext(item.path if item.offset < 0 else item.key)[1].lower()
        if ext in OTHER_IMAGE_EXTENSIONS and "identify" in e.reason:
            return None, (f"{ext[1:].upper()} is a format this Pillow cannot decode (no plugin for {ext}); convert "
                          "it to JPEG or PNG, or install a Pillow plugin for it (e.g. pillow-heif)"), []
        return None, e.reason, []
    except Exception as e:  # noqa: BLE001 - one bad image must never stop the job
        return None, f"cannot decode: {type(e).__name__}: {e}", []


def load_items(items: list[Item], pre: PreprocessSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS
               ) -> tuple[list[Item], list[np.ndarray], list[tuple[Item, str]]]:
    """:func:`load_item` over ``items``: (items that decoded, their pixels, (item, reason) of the rest)."""
    ok, arrays, skipped = [], [], []
    for it in items:
        px, reason, _ = load_item(it, pre, max_pixels)
        if px is None:
            skipped.append((it, reason))
        else:
            ok.append(it)
            arrays.append(px)
    return ok, arrays, skipped


def source_items(spec: str | os.PathLike, option: str) -> tuple[list[Item], str]:
    """(every item, location) of any input of the source layer (a folder, a path list, WebDataset
    tars), in the source's order: the images an option such as ``--validate-images`` names. An input
    that cannot be opened is an InputError naming ``option``."""
    try:
        src = open_source(spec)
    except InputError as e:
        raise InputError(f"{option}: {e}") from None
    return [it for part in src.parts for it in part.items()], src.location


def item_class(item: Item) -> str | None:
    """The folder an item's key names (its class, as ``--labels-from-dirs`` reads a folder), or None
    for an image at the top."""
    return posixpath.dirname(item.key) or None


class GraphOutputs:
    """What the embed stage keeps of a graph's outputs per image: the embedding, the artifact count
    (when the graph has ``artifact_mask``) and any ``extra`` outputs asked for."""

    def __init__(self, embedder: Embedder, extra: tuple[str, ...] = ()):
        have = embedder.output_names()
        missing = [n for n in extra if n not in have]
        if missing:
            raise OptionError(f"extra_outputs: the graph has no output {missing[0]!r} (outputs: {', '.join(have)})")
        self.embedder = embedder
        self.extra = tuple(extra)
        self.has_mask = OUTPUT_MASK in have
        self.fetch = (*self.extra, *((OUTPUT_MASK,) if self.has_mask and OUTPUT_MASK not in self.extra else ()))

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(embeddings [B, D], artifact counts [B] int64, {extra name: [B, ...] float32})."""
        got = self.embedder.run(pixels, self.fetch)
        n = len(pixels)
        counts = (np.asarray(got[OUTPUT_MASK]).reshape(n, -1).sum(axis=1).astype(np.int64) if self.has_mask
                  else np.full(n, -1, np.int64))
        return got[OUTPUT_EMBEDDING], counts, {k: np.asarray(got[k], np.float32) for k in self.extra}


def embed_folder(folder: str | os.PathLike, onnx_path: str | os.PathLike, *, paths: list[Path] | None = None,
                 scan: FolderScan | None = None, **kwargs) -> EmbedResult:
    """Embed every image under ``folder`` (or the given ``paths``, or an existing ``scan``): the
    keys are the relative POSIX paths. ``kwargs``: those of :func:`embed_items`."""
    scan = scan or FolderScan.of(folder, paths)
    return embed_items(scan.items(), onnx_path, root=scan.root, **kwargs)


def embed_items(items: list[Item], onnx_path: str | os.PathLike, *, root: str | os.PathLike = "",
                manifest: dict | None = None, store=None, batch_size: int | None = None,
                workers: int | None = None, pool: str = "thread", device: str = "auto",
                intra_op_threads: int | None = None, progress: bool = True, session=None,
                model_id: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                extra_outputs: tuple[str, ...] = (), log: Callable[[str], None] | None = None) -> EmbedResult:
    """Embed ``items`` (:class:`~itae_export.data.sources.Item`: files or tar members, from any source)
    with an exported model.

    Vectors found in ``store`` (an EmbeddingStore, or a path to one; None: no store) for this model
    and the same file (size, mtime and ctime) are reused; new ones are committed to it one batch at
    a time, so an interrupted run loses at most one batch. Bad images are skipped with a reason,
    never fatal. Per image the result holds the artifact count (``artifact_counts``) and the
    ``extra_outputs`` of the graph (``extra``). ``session`` is an optional
    :class:`itae_export.runtime.Session`; ``manifest`` and ``model_id`` (the model's
    :func:`~itae_export.onnx.identity.model_fingerprint`) when the caller has them.
    """
    if batch_size is not None and batch_size < 1:
        raise OptionError(f"--batch-size: {batch_size} must be >= 1")
    if pool not in POOLS:
        raise OptionError(f"--pool: {pool!r} is not one of {', '.join(POOLS)}")
    if workers is not None and workers < 1:
        raise OptionError(f"--workers: {workers} must be >= 1")
    extra_outputs = tuple(extra_outputs)
    keys = [it.key for it in items]
    manifest = manifest or read_manifest(onnx_path)
    pre = PreprocessSpec.from_manifest(manifest.get("preprocessing"))

    own_store = store is not None and not isinstance(store, EmbeddingStore)
    if own_store:
        store = EmbeddingStore(store)
    try:
        sess, provider = session if session is not None else open_session(
            onnx_path, device, intra_op_threads=intra_op_threads, spinning=False)
        run = GraphOutputs(Embedder(sess, provider), extra_outputs)
        batch_size = batch_size or default_batch_size(provider)
        workers = decode_workers(workers, pool, log) or default_workers(provider)
        model_id = model_id or model_fingerprint(onnx_path, cache=store)

        t0 = time.perf_counter()
        fkeys, skipped = file_keys(items)
        done = lookup(store, model_id, fkeys, extra_outputs, run.has_mask)
        todo = [it for it in items if it.key in fkeys and it.key not in done]
        n_reused = len(done)
        conversions: Counter = Counter()
        new: dict[str, tuple] = {}
        if log and n_reused:
            log(f"Reusing {n_reused} stored embeddings; {len(todo)} images to embed")

        if todo:
            _run_pipeline(todo, pre, max_pixels, run, store, model_id, fkeys, batch_size, workers, pool, progress,
                          new, skipped, conversions)
        embed_seconds = time.perf_counter() - t0
    finally:
        if own_store:
            store.close()

    vectors = {**done, **new}
    good = [k for k in keys if k in vectors]
    dim = int(manifest.get("embed_dim") or 0)
    emb = (np.stack([vectors[k][0] for k in good]).astype(np.float32) if good else np.zeros((0, dim), np.float32))
    return EmbedResult(
        root=Path(root), paths=good, embeddings=emb,
        skipped=[(k, skipped[k]) for k in keys if k in skipped],
        n_found=len(items), n_new=len(new), n_reused=n_reused, provider=provider, model_id=model_id,
        embed_seconds=embed_seconds, batch_size=batch_size, workers=workers, conversions=dict(conversions),
        artifact_counts=np.array([vectors[k][1] for k in good], np.int64),
        extra={name: (np.stack([vectors[k][2][name] for k in good]) if good else np.zeros((0, 0), np.float32))
               for name in extra_outputs},
    )


def file_keys(items: list[Item]) -> tuple[dict[str, tuple[bytes, tuple[int, int, int]]], dict[str, str]]:
    """({key: (store key, file key)} of each item whose file can be stat'ed (a tar once), {key: reason} of the others:
    an item the source marked as skipped keeps the source's reason)."""
    keys, skipped, stats = {}, {}, {}
    for it in items:
        if it.skip is not None:  # the source already knows it has no image (an empty row, a link member ...)
            skipped[it.key] = it.skip
            continue
        try:
            if it.path not in stats:
                stats[it.path] = file_key(it.path)
            keys[it.key] = (source_key(it.path, it.offset), stats[it.path])
        except OSError as e:
            skipped[it.key] = f"cannot stat: {e.strerror or e}"
    return keys, skipped


def lookup(store, model_id: str, fkeys: dict, extra: tuple[str, ...], has_mask: bool) -> dict[str, tuple]:
    """{key: (vector, artifact count, {extra: vector})} of the items the store holds, with every extra output."""
    if store is None or not fkeys:
        return {}
    by_src = {src: fk for src, fk in fkeys.values()}
    hit = store.lookup(model_id, by_src)
    extras = {name: store.lookup(extra_model_id(model_id, name), {s: by_src[s] for s in hit}) for name in extra}
    out = {}
    for key, (src, _) in fkeys.items():
        if src in hit and all(src in extras[n] for n in extra) and (hit[src][1] >= 0 or not has_mask):
            out[key] = (hit[src][0], hit[src][1], {n: extras[n][src][0] for n in extra})
    return out


def reuse_stored(store, model_id: str, todo: list[Item], has_mask: bool, *, unstat_is_skip: bool = True
                 ) -> tuple[list[tuple], list[Item], dict, int]:
    """What the embedding store already holds of ``todo`` (items of one part), for both engines:
    (rows for the resume record, the items left to embed, {key: (store key, file key)} to store
    their vectors under, how many rows came from the store). The rows are the store's hits and the
    items the source marked as skipped or, with ``unstat_is_skip``, whose file cannot be stat'ed
    here (a Ray cluster may see files this driver cannot: those are left to embed, uncached)."""
    keys, unstat = file_keys(todo)
    hit = lookup(store, model_id, keys, (), has_mask)
    rows = [(it.pos, text_key(it.key), hit[it.key][0], None, hit[it.key][1]) for it in todo if it.key in hit]
    gone = set(unstat) if unstat_is_skip else set(unstat) & {it.key for it in todo if it.skip is not None}
    rows += [(it.pos, text_key(it.key), None, unstat[it.key]) for it in todo if it.key in gone]
    left = [it for it in todo if it.key not in hit and it.key not in gone]
    return rows, left, keys, len(hit)


def _run_pipeline(todo, pre, max_pixels, run: GraphOutputs, store, model_id, fkeys, batch_size, workers, pool,
                  progress, new, skipped, conversions) -> None:
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
                pending.append((nxt.key, ex.submit(load_item, nxt, pre, max_pixels)))

        fill()
        while pending:
            batch_keys, batch_px = [], []
            while pending and len(batch_keys) < batch_size:
                k, fut = pending.popleft()
                px, reason, notes = fut.result()
                fill()
                if px is None:
                    skipped[k] = reason
                    bar.update(1)
                    continue
                conversions.update(notes)
                batch_keys.append(k)
                batch_px.append(px)
            if not batch_keys:
                continue
            vecs, counts, extra = run(np.stack(batch_px))
            finite = np.isfinite(vecs).all(axis=1)  # a NaN vector would poison K-Means: never stored
            for k in (k for k, ok in zip(batch_keys, finite) if not ok):
                skipped[k] = NON_FINITE
            good = [k for k, ok in zip(batch_keys, finite) if ok]
            vecs, counts, extra = vecs[finite], counts[finite], {n: v[finite] for n, v in extra.items()}
            if store is not None and good:
                store.add(model_id, [(fkeys[k][0], *fkeys[k][1]) for k in good], vecs, counts, extra)
            for i, k in enumerate(good):
                new[k] = (vecs[i], int(counts[i]), {n: v[i] for n, v in extra.items()})
            bar.update(len(batch_keys))
    finally:
        bar.close()
        ex.shutdown(wait=True, cancel_futures=True)
