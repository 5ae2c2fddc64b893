"""The Ray Data engine of the sharded embed stage (``pip install -e '.[ray]' in the itae-export clone``).

    read (the driver lists the items still to embed, a window of whole parts at a time, as columns)
      -> decode + preprocess: stateless CPU tasks, ``num_cpus=1`` each
      -> inference: an actor pool, one ONNX Runtime session per actor, built inside the actor
         (``num_gpus=1`` per actor on CUDA; ORT intra-op threads = the actor's CPUs)
      -> the driver commits each batch to the resume record and writes each part file when its
         last row is in (the same files, manifest and record as the local engine)

The driver writes every file, so the workers need no shared output folder; they do need to read
the images at the same paths (a shared file system, as on any Slurm or Kubernetes cluster), and
itae-export installed. The model's bytes go through the object store, so the workers need no copy.

Traps handled here: an actor pool that takes every CPU starves the decode tasks and hangs, so the
pool is checked against the cluster's CPUs first; Ray's own tensor column type reads back as a
variable-length list in plain pyarrow, so Ray never writes the shard files; an ONNX Runtime
session cannot be pickled, so each actor builds its own.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from itae_export.data.embed import GraphOutputs, default_batch_size, load_item, reuse_stored
from itae_export.data.shards import RunStats
from itae_export.data.store import EmbeddingStore
from itae_export.data.sources import DEFAULT_PART_SIZE, Item, text_key
from itae_export.engines.local import open_run
from itae_export.errors import InputError, MissingDependencyError
from itae_export.images import PreprocessSpec
from itae_export.onnx.contract import EXTERNAL_DATA_SUFFIX, OUTPUT_MASK
from itae_export.onnx.manifest import read_manifest
from itae_export.runtime import Embedder, open_session

# The driver hands Ray this many images at a time (whole parts): what it holds of the work list is
# one window of columnar rows (~100 bytes an image), not every pending image of the shard.
WINDOW_ITEMS = 200_000
ROW_COLUMNS = ("part", "pos", "key", "path", "offset", "length", "skip")  # skip: "" or why not embeddable


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependencyError("--engine ray needs Ray Data: pip install -e '.[ray]' in the itae-export clone") from None
    return ray


def check_resources(total_cpus: float, actors: int, actor_cpus: float) -> None:
    """The actor pool must leave at least one CPU to the decode tasks, or the pipeline never moves."""
    need = actors * actor_cpus
    if need + 1 > total_cpus + 1e-9:
        raise InputError(
            f"--actors {actors} x --actor-cpus {actor_cpus:g} = {need:g} CPUs leaves no CPU of the Ray cluster's "
            f"{total_cpus:g} to decode images: the readers would starve and the job hang. Use fewer or smaller "
            "actors, or start Ray with more CPUs (local Ray: num_cpus above the actors' total)")


def model_files(onnx_path: str | os.PathLike) -> dict[str, bytes]:
    """The .onnx file and its external-data file, by name, to ship to the actors."""
    p = Path(onnx_path)
    files = {p.name: p.read_bytes()}
    ext = p.with_name(p.name + EXTERNAL_DATA_SUFFIX)
    if ext.is_file():
        files[ext.name] = ext.read_bytes()
    return files


def decode_batch(batch: dict, pre: dict) -> dict:
    """Ray task: decode and preprocess a batch of items; failed items get zero pixels and a reason."""
    spec = PreprocessSpec.from_manifest(pre)
    n = len(batch["key"])
    pixels = np.zeros((n, 3, spec.height, spec.width), np.float32)
    reasons = []
    for j in range(n):
        item = Item(int(batch["pos"][j]), str(batch["key"][j]), os.fsdecode(bytes(batch["path"][j])),
                    int(batch["offset"][j]), int(batch["length"][j]), str(batch["skip"][j]) or None)
        px, reason, _ = load_item(item, spec)
        if px is not None:
            pixels[j] = px
        reasons.append(reason or "")
    return {"part": batch["part"], "pos": batch["pos"], "key": batch["key"], "reason": np.array(reasons, dtype=object),
            "pixels": pixels}


class EmbedActor:
    """Ray actor: one ONNX Runtime session, built here (in the actor's process), never on the driver."""

    def __init__(self, files_ref, onnx_name: str, device: str, threads: int):
        import ray

        files = ray.get(files_ref) if isinstance(files_ref, ray.ObjectRef) else files_ref
        self._dir = tempfile.mkdtemp(prefix="itae-ray-model-")
        for name, data in files.items():
            with open(os.path.join(self._dir, name), "wb") as f:
                f.write(data)
        sess, provider = open_session(os.path.join(self._dir, onnx_name), device, intra_op_threads=threads,
                                      spinning=False)
        self.embed = GraphOutputs(Embedder(sess, provider))  # the embedding and the artifact count
        self.provider = provider
        self.pid = os.getpid()

    def __call__(self, batch: dict) -> dict:
        ok = np.array([r == "" for r in batch["reason"]], bool)
        n = len(ok)
        vecs = None
        counts = np.full(n, -1, np.int64)
        if ok.any():
            got, counts[ok], _ = self.embed(batch["pixels"][ok])
            vecs = np.zeros((n, got.shape[1]), np.float32)
            vecs[ok] = got
        return {"part": batch["part"], "pos": batch["pos"], "key": batch["key"], "reason": batch["reason"],
                "vector": vecs if vecs is not None else np.zeros((n, 1), np.float32), "artifacts": counts,
                "actor_pid": np.full(n, self.pid, np.int64)}


def embed_shards_ray(input_spec, out, onnx_path, *, shard="0/1", part_size: int = DEFAULT_PART_SIZE,
                     input_format: str = "auto", batch_size: int | None = None, device: str = "auto",
                     address: str | None = None, actors: int | None = None, actor_cpus: float | None = None,
                     num_cpus: int | None = None, progress: bool = False, log: Callable[[str], None] | None = None,
                     on_batch: Callable[[RunStats], None] | None = None,
                     window_items: int = WINDOW_ITEMS, cache: bool = True) -> RunStats:
    """:func:`itae_export.engines.local.embed_shards` on Ray Data: same files, same resume record,
    and (with ``cache``) the same embedding store, read and filled by this driver: images it holds
    for this model are not sent to Ray.

    Uses the Ray already initialised in this process, else ``address`` (or ``$RAY_ADDRESS``), else
    starts a local Ray with ``num_cpus`` (default: the actors' CPUs + 2). ``stats.actor_pids`` lists
    the processes that ran inference. The work goes to Ray in windows of whole parts of about
    ``window_items`` images, so the driver never holds the whole work list of a large shard."""
    ray = _ray()
    log = log or (lambda m: None)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size: {batch_size} must be >= 1")
    run, pre = open_run(input_spec, out, onnx_path, shard=shard, part_size=part_size, input_format=input_format,
                        log=log)
    t0 = time.perf_counter()
    started = False
    plan = None
    store = EmbeddingStore() if cache else None
    has_mask = OUTPUT_MASK in {o.get("name") for o in read_manifest(onnx_path).get("outputs", [])}
    with run:
        try:
            for window in _windows(run, window_items, store, has_mask):
                if not started and not ray.is_initialized():
                    address = address or os.environ.get("RAY_ADDRESS")
                    want = (actors or 1) * (actor_cpus or 2) + 2
                    kw = {"address": address} if address else {"num_cpus": num_cpus or int(np.ceil(want))}
                    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, **kw)
                    started = True
                if plan is None:  # once per run: the cluster, the pool, and the model's bytes in the object store
                    plan = _plan(ray, device, actors, actor_cpus, batch_size)
                    plan["files_ref"] = ray.put(model_files(onnx_path))
                    _configure(ray, progress)
                    log(f"Ray: {plan['cpus']:g} CPUs, {plan['gpus']} GPUs; {plan['actors']} actors x "
                        f"{plan['actor_cpus']:g} CPUs{' + 1 GPU' if plan['use_gpu'] else ''}; batches of {plan['bs']}")
                log(f"Ray: {window.n_rows} images of {len(window.parts)} parts")
                _execute(ray, run, window, pre, onnx_path, plan, on_batch, store)
        finally:
            if started:
                ray.shutdown()
            if store is not None:
                store.close()
    run.stats.seconds = time.perf_counter() - t0
    return run.stats


@dataclass
class _Window:
    """Whole parts, up to ~``WINDOW_ITEMS`` pending images, as columns (lists, one per ROW_COLUMNS)."""

    columns: dict
    expected: dict  # part id -> images still to embed
    parts: dict  # part id -> (Part, number of items)
    store_keys: dict  # (part id, pos) -> (store key, file key) of the images to store once embedded

    @property
    def n_rows(self) -> int:
        return len(self.columns["key"])


def _windows(run, window_items: int, store=None, has_mask: bool = True) -> Iterator[_Window]:
    """The shard's pending work in windows of whole parts; parts with nothing left (the store held
    the rest) are written at once."""
    cols: dict[str, list] = {c: [] for c in ROW_COLUMNS}
    expected, parts, store_keys = {}, {}, {}

    def flush():
        return _Window(cols, dict(expected), dict(parts), dict(store_keys))

    for part, n_items, todo in run.pending():
        if todo and store is not None:
            done, todo, keys, reused = reuse_stored(store, run.model_id, todo, has_mask, unstat_is_skip=False)
            run.stats.reused += reused
            if done:
                run.add(part.id, done)
            store_keys.update({(part.id, it.pos): keys[it.key] for it in todo if it.key in keys})
        if not todo:
            run.finish_part(part, n_items)
            continue
        parts[part.id] = (part, n_items)
        expected[part.id] = len(todo)
        for it in todo:
            cols["part"].append(part.id)
            cols["pos"].append(it.pos)
            cols["key"].append(text_key(it.key))  # UTF-8 text, as the resume record and the parts hold it
            cols["path"].append(os.fsencode(it.path))  # the real bytes of the name: any file name opens
            cols["offset"].append(it.offset)
            cols["length"].append(it.length)
            cols["skip"].append(it.skip or "")
        if len(cols["key"]) >= window_items:
            yield flush()
            cols = {c: [] for c in ROW_COLUMNS}
            expected, parts, store_keys = {}, {}, {}
    if cols["key"]:
        yield flush()


def _tables(columns: dict, blocks: int) -> list:
    """The window as ``blocks`` pyarrow tables (Ray Data's blocks), rows in order."""
    import pyarrow as pa

    types = {"key": pa.string(), "path": pa.binary(), "skip": pa.string()}
    table = pa.table({c: pa.array(v, type=types.get(c, pa.int64()))
                      for c, v in columns.items()})
    step = -(-table.num_rows // blocks)
    return [table.slice(i, step) for i in range(0, table.num_rows, step)]


def _plan(ray, device, actors, actor_cpus, batch_size) -> dict:
    """Actors, CPUs per actor, GPU use and batch size for the cluster Ray is connected to (checked)."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if device == "cuda" and gpus == 0:
        raise InputError("--device cuda: the Ray cluster has no GPU")
    actors = actors or (gpus if use_gpu else 1)
    actor_cpus = actor_cpus or (1.0 if use_gpu else 2.0)
    check_resources(float(res.get("CPU", 0)), actors, actor_cpus)
    if use_gpu and actors > gpus:
        raise InputError(f"--actors {actors}: the Ray cluster has {gpus} GPUs (one per actor)")
    bs = batch_size or default_batch_size("CUDAExecutionProvider" if use_gpu else None)
    return {"cpus": float(res.get("CPU", 0)), "gpus": gpus, "use_gpu": use_gpu, "actors": actors,
            "actor_cpus": actor_cpus, "bs": bs, "device": "cuda" if use_gpu else "cpu"}


def _configure(ray, progress: bool) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    ctx.execution_options.preserve_order = False


def _execute(ray, run, window: _Window, pre, onnx_path, plan: dict, on_batch, store=None) -> None:
    bs, actors, actor_cpus, use_gpu = plan["bs"], plan["actors"], plan["actor_cpus"], plan["use_gpu"]
    files_ref = plan["files_ref"]
    pre_dict = {"resolution": [pre.height, pre.width], "mean": list(pre.mean), "std": list(pre.std),
                "scale": pre.scale, "resize": pre.resize, "interpolation": pre.interpolation}
    blocks = max(1, min(window.n_rows // bs, 4 * max(1, int(plan["cpus"]))))
    ds = ray.data.from_arrow(_tables(window.columns, blocks))
    # memory= is a real hint (a batch of pixels, twice), and it also keeps Ray from fusing the decode tasks
    # into the actors: fused, decoding would run inside the actor, serially with inference
    px_bytes = bs * 3 * pre.height * pre.width * 4
    ds = ds.map_batches(decode_batch, fn_kwargs={"pre": pre_dict}, batch_size=bs, num_cpus=1,
                        memory=max(64 << 20, 2 * px_bytes), batch_format="numpy")
    ds = ds.map_batches(EmbedActor, fn_constructor_kwargs={"files_ref": files_ref, "onnx_name": Path(onnx_path).name,
                                                           "device": plan["device"], "threads": max(1, int(actor_cpus))},
                        batch_size=bs, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=actor_cpus, num_gpus=1 if use_gpu else 0,
                        batch_format="numpy")
    pids: set[int] = set(run.stats.actor_pids or [])
    remaining = dict(window.expected)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        by_part: dict[int, list] = {}
        for j in range(len(batch["key"])):
            reason = str(batch["reason"][j])
            v = None if reason else batch["vector"][j]
            by_part.setdefault(int(batch["part"][j]), []).append(
                (int(batch["pos"][j]), str(batch["key"][j]), v, reason or None, int(batch["artifacts"][j])))
        pids.update(int(p) for p in batch["actor_pid"])
        if store is not None:
            _store_batch(store, run.model_id, window.store_keys, by_part)
        for pid, prow in by_part.items():
            run.add(pid, prow)
            remaining[pid] -= len(prow)
            if remaining[pid] == 0:
                run.finish_part(*window.parts[pid])
        if on_batch is not None:
            on_batch(run.stats)
    left = {p: r for p, r in remaining.items() if r}
    if left:
        raise RuntimeError(f"Ray returned too few rows for parts {sorted(left)}")
    run.stats.actor_pids = sorted(pids)


def _store_batch(store, model_id: str, store_keys: dict, by_part: dict) -> None:
    """The finite vectors of one batch into the embedding store (a NaN vector is never stored)."""
    keys, vecs, counts = [], [], []
    for pid, prow in by_part.items():
        for pos, _, v, _, count in prow:
            fk = store_keys.get((pid, pos))
            if v is not None and fk is not None and np.isfinite(v).all():
                keys.append((fk[0], *fk[1]))
                vecs.append(v)
                counts.append(count)
    if keys:
        store.add(model_id, keys, np.stack(vecs), np.asarray(counts, np.int64))
