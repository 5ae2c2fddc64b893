"""The local engine of the sharded embed stage: decode threads a few batches ahead, one ONNX Runtime
session in the main thread (the same decode, preprocessing and session as ``itae-cluster``), rows
committed to the resume record one batch at a time, each part written when its last row is in."""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from pathlib import Path
from typing import Callable

import numpy as np

from itae_export.data.embed import (
    NON_FINITE,
    GraphOutputs,
    default_batch_size,
    decode_workers,
    default_workers,
    load_item,
    progress_bar,
    reuse_stored,
)
from itae_export.data.store import EmbeddingStore
from itae_export.data.shards import RunStats, ShardRun
from itae_export.data.sources import DEFAULT_PART_SIZE, open_source, parse_shard, text_key
from itae_export.onnx.identity import model_fingerprint
from itae_export.errors import InputError, OptionError
from itae_export.images import DEFAULT_MAX_PIXELS, PreprocessSpec
from itae_export.onnx.manifest import read_manifest
from itae_export.runtime import Embedder, cap_threads, open_session


def model_identity(onnx_path: str | os.PathLike) -> dict:
    """What the shard manifest records of the model: its sha256 fingerprint and its manifest's identity."""
    m = read_manifest(onnx_path)
    return {"id": model_fingerprint(onnx_path), "name": m.get("model"), "onnx": str(Path(onnx_path).resolve()),
            "embed_dim": m.get("embed_dim"), "num_tokens": m.get("num_tokens"), "itae": m.get("itae"),
            "precision": m.get("precision"),
            "preprocessing": m.get("preprocessing")}


def open_run(input_spec, out, onnx_path, *, shard="0/1", part_size: int = DEFAULT_PART_SIZE,
             input_format: str = "auto", log=None) -> tuple[ShardRun, PreprocessSpec]:
    """Resolve the input, create or check the manifest, open this worker's resume record."""
    shard_t = parse_shard(shard) if isinstance(shard, (str, type(None))) else tuple(shard)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} is a file, not a folder")
    source = open_source(input_spec, input_format, part_size, exclude=out)
    model = model_identity(onnx_path)
    pre = PreprocessSpec.from_manifest(model["preprocessing"])
    return ShardRun(source, out, model, shard=shard_t, part_size=part_size, log=log), pre


def embed_shards(input_spec, out, onnx_path, *, shard="0/1", part_size: int = DEFAULT_PART_SIZE,
                 input_format: str = "auto", batch_size: int | None = None, workers: int | None = None,
                 device: str = "auto", intra_op_threads: int | None = None, progress: bool = True,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, cache: bool = True,
                 log: Callable[[str], None] | None = None,
                 on_batch: Callable[[RunStats], None] | None = None) -> RunStats:
    """Embed worker ``shard`` ("i/N") of ``input_spec`` into the shard directory ``out``.

    Parts already written are skipped; rows already in the resume record are not embedded again,
    nor (with ``cache``) images the shared embedding cache holds for this model
    (:mod:`itae_export.data.store`); new vectors go to the cache too. ``on_batch(stats)`` runs after
    each committed batch. Returns this run's :class:`RunStats`."""
    if batch_size is not None and batch_size < 1:
        raise OptionError(f"--batch-size: {batch_size} must be >= 1")
    if workers is not None and workers < 1:
        raise OptionError(f"--workers: {workers} must be >= 1")
    if max_pixels is not None and max_pixels < 1:
        raise OptionError(f"--max-pixels: {max_pixels} must be >= 1")
    run, pre = open_run(input_spec, out, onnx_path, shard=shard, part_size=part_size, input_format=input_format,
                        log=log)
    t0 = time.perf_counter()
    with run:
        if not run.todo:
            return run.stats
        sess, provider = open_session(onnx_path, device, intra_op_threads=cap_threads(intra_op_threads, log),
                                      spinning=False)
        if log:
            log(f"Execution provider: {provider}")
        outs = GraphOutputs(Embedder(sess, provider))
        store = EmbeddingStore() if cache else None
        try:
            _pipeline(run, pre, outs, store, batch_size or default_batch_size(provider),
                      decode_workers(workers, "thread", log) or default_workers(provider), progress, max_pixels, on_batch)
        finally:
            if store is not None:
                store.close()
    run.stats.seconds = time.perf_counter() - t0
    return run.stats


def _pipeline(run: ShardRun, pre, outs: GraphOutputs, store, batch_size: int, workers: int, progress: bool,
              max_pixels, on_batch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    remaining: dict[int, int] = {}
    parts: dict[int, tuple] = {}
    conversions: Counter = Counter()
    fkeys: dict = {}  # key -> (store key, file key) of the items being embedded

    def commit(rows_by_part: dict[int, list]) -> None:
        for pid, rows in rows_by_part.items():
            run.add(pid, rows)
            remaining[pid] -= len(rows)
            if remaining[pid] == 0:
                run.finish_part(*parts[pid])

    def stream():
        for part, n_items, todo in run.pending():
            parts[part.id] = (part, n_items)
            remaining[part.id] = len(todo)
            if not todo:  # every row was in the resume record: only the file is left to write
                run.finish_part(part, n_items)
                continue
            done, left, keys, reused = reuse_stored(store, run.model_id, todo, outs.has_mask)
            run.stats.reused += reused
            fkeys.update(keys)
            if done:
                commit({part.id: done})
            for it in left:
                yield part.id, it

    ex = ThreadPoolExecutor(workers, thread_name_prefix="itae-decode")
    ahead = 2 * batch_size + workers
    pending: deque = deque()
    it = stream()
    bar = progress_bar(sum(p.n_items or 0 for p in run.todo), progress, "embedding")

    def fill() -> None:
        while len(pending) < ahead:
            nxt = next(it, None)
            if nxt is None:
                return
            pending.append((nxt[0], nxt[1], ex.submit(load_item, nxt[1], pre, max_pixels)))

    try:
        fill()
        while pending:
            rows: dict[int, list] = {}
            meta, px = [], []
            while pending and len(px) < batch_size:
                pid, item, fut = pending.popleft()
                pixels, reason, notes = fut.result()
                fill()
                if pixels is None:
                    rows.setdefault(pid, []).append((item.pos, text_key(item.key), None, reason))
                    continue
                conversions.update(notes)
                meta.append((pid, item))
                px.append(pixels)
            if px:
                vecs, counts, _ = outs(np.stack(px))
                finite = np.isfinite(vecs).all(axis=1)  # a NaN vector would poison K-Means: never stored
                for (pid, item), v, ok, count in zip(meta, vecs, finite, counts):
                    rows.setdefault(pid, []).append(
                        (item.pos, text_key(item.key), v if ok else None, None if ok else NON_FINITE, int(count)))
                if store is not None and finite.any():
                    good = [item for (_, item), ok in zip(meta, finite) if ok]
                    store.add(run.model_id, [(fkeys[i.key][0], *fkeys[i.key][1]) for i in good], vecs[finite],
                              counts[finite])
            for _, item in meta:
                fkeys.pop(item.key, None)  # the work list of a large shard is never held whole
            commit(rows)
            bar.update(sum(len(r) for r in rows.values()))
            if on_batch is not None:
                on_batch(run.stats)
    finally:
        bar.close()
        ex.shutdown(wait=True, cancel_futures=True)
        run.stats.conversions = dict(conversions)
