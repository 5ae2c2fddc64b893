"""The cluster stage of a shard directory: K-Means over every part without loading everything twice.

Large sets (from :data:`~itae_export.cluster.faiss_kmeans.FAISS_MIN_POINTS` vectors on, where faiss
is installed) never hold all vectors in memory: the training sample is gathered part by part, and
the assignment reads one part at a time (each part memory-mapped) and appends its rows to the
output. Smaller sets are read into one array (each part copied into it once) and clustered by
:func:`~itae_export.cluster.job.kmeans_assign`, the same K-Means as ``itae-cluster``.

Outputs in ``out`` (default ``SHARDS/clusters_k<k>``), each written atomically, summary last: the
output set of ``itae-cluster`` (docs/outputs.md): ``assignments.csv`` (path, cluster, distance; up to
:data:`~itae_export.data.outputs.CSV_MAX_ROWS` rows), ``skipped.csv``, ``summary.json`` with the same
fields; and ``assignments.parquet`` (key, cluster int32, distance float32, in part order),
``centroids.npy``. The embeddings are the shard directory's parts (``summary.json`` ``shards``),
not copied; ``itae-search`` and the report read them there. ``summary.json`` holds the
``artifacts`` block (:func:`~itae_export.cluster.artifacts.cluster_artifacts`, from the parts'
per-image counts) and, with ``use_labels``, ``labels`` and ``metrics``
(:func:`~itae_export.cluster.job.label_metrics`), with a ``label`` column in the assignments.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from itae_export.cluster import faiss_kmeans as fk
from itae_export.cluster.artifacts import WARN_SHARE, cluster_artifacts
from itae_export.cluster.job import (
    ClusterOptions,
    check_k,
    check_seed,
    kmeans_assign,
    kmeans_backend,
    label_metrics,
    labels_from_dirs,
    run_cluster_job,
)
from itae_export.cluster.metrics import l2_normalize
from itae_export.data import outputs
from itae_export.data.outputs import npy_bytes
from itae_export.data.shards import open_shards, part_artifacts, read_part
from itae_export.data.embed import default_out_dir
from itae_export.data.sources import DEFAULT_PART_SIZE, open_source, require_pyarrow
from itae_export.data.store import check_legacy_store
from itae_export.engines.local import embed_shards
from itae_export.errors import InputError, MissingDependencyError
from itae_export.files import atomic_write_bytes, atomic_write_json, ensure_dir
from itae_export.images import DEFAULT_MAX_PIXELS
from itae_export.onnx.manifest import read_manifest

BACKENDS = ("auto", "faiss", "sklearn")


def choose_backend(n: int, backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise InputError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "faiss" and not fk.faiss_available():
        raise MissingDependencyError("--backend faiss needs faiss: pip install -e '.[scale]' in the itae-export clone (faiss-cpu)")
    if backend == "auto":
        return kmeans_backend(n)
    return backend


def cluster_shards(shard_dir: str | os.PathLike, k: int, out: str | os.PathLike | None = None, *,
                   backend: str = "auto", sample_size: int | None = None, niter: int = fk.DEFAULT_NITER,
                   seed: int = 0, n_init: int = 10, chunk: int = fk.ASSIGN_CHUNK, allow_partial: bool = False,
                   use_labels: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Cluster every vector of ``shard_dir`` into ``k`` clusters; returns the summary (also in summary.json).

    ``use_labels``: each key's parent folder is its label (``--labels-from-dirs``); ACC/NMI/ARI go
    into summary.json's ``metrics``, as itae-cluster writes them."""
    log = log or (lambda m: None)
    pa, pq = require_pyarrow("the cluster stage")
    check_k(k)
    check_seed(seed)
    t0 = time.perf_counter()
    shards = open_shards(shard_dir, allow_partial=allow_partial)
    n = shards.n
    check_k(k, n, "embedded images")
    backend = choose_backend(n, backend)
    out = Path(out) if out is not None else Path(shard_dir) / f"clusters_k{k}"
    out.mkdir(parents=True, exist_ok=True)
    log(f"{n} vectors in {len(shards.files)} parts; K-Means with {backend}")
    classes, y = _labels(shards) if use_labels else (None, None)  # before K-Means: a key at the root fails now

    if backend == "sklearn":
        x = shards.load_all()
        labels, dist, inertia = kmeans_assign(x, k, seed=seed, n_init=n_init) if n < fk.FAISS_MIN_POINTS else \
            _sklearn(x, k, seed, n_init)
        centroids = _means(x, labels, k)
        del x
        kinfo = {"backend": "sklearn", "k": k, "seed": seed, "n_init": n_init, "inertia": inertia}
        label_iter = iter([(labels, dist)])
        per_part = False
    else:
        size = sample_size or fk.default_sample_size(n, k)
        sample = fk.sample_rows(shards.vectors, shards.counts, size, seed=seed)
        model = fk.train(sample, k, niter=niter, seed=seed, inplace=True)
        del sample
        centroids = model.centroids
        kinfo = model.summary()
        per_part = True
    t_fit = time.perf_counter() - t0

    fields = [("key", pa.string()), ("cluster", pa.int32()), ("distance", pa.float32())]
    schema = pa.schema(fields + ([("label", pa.string())] if use_labels else []))
    assign = np.empty(n, np.int64)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".assignments.parquet.", suffix=".tmp")
    os.close(fd)
    sizes = np.zeros(k, np.int64)
    inertia = 0.0
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
            if per_part:
                at = 0
                for f in shards.files:
                    table, vecs = read_part(f, columns=("key", "vector"))
                    lab, dist = fk.assign([vecs], centroids, chunk)
                    w.write_table(_rows(pa, table.column("key"), lab, dist, schema, classes, y, at))
                    assign[at:at + len(lab)] = lab
                    at += len(lab)
                    sizes += np.bincount(lab, minlength=k)
                    inertia += float((dist ** 2).sum())
            else:
                lab, dist = next(label_iter)
                at = 0
                for f in shards.files:
                    keys = read_part(f, columns=("key",))[0].column("key")
                    w.write_table(_rows(pa, keys, lab[at:at + len(keys)], dist[at:at + len(keys)], schema,
                                        classes, y, at))
                    at += len(keys)
                assign[:] = lab
                sizes = np.bincount(lab, minlength=k)
                inertia = float(kinfo["inertia"])
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out / "assignments.parquet")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    kinfo["inertia"] = inertia
    atomic_write_bytes(out / "centroids.npy", npy_bytes(np.asarray(centroids, np.float32)))
    if n <= outputs.CSV_MAX_ROWS:  # the assignments.csv of itae-cluster, from the parquet just written
        t = pq.read_table(out / "assignments.parquet")
        cols = [t.column("key").to_pylist(), t.column("cluster").to_pylist(),
                (f"{d:.6f}" for d in t.column("distance").to_pylist())]
        if use_labels:
            cols.append(t.column("label").to_pylist())
        atomic_write_bytes(out / outputs.ASSIGNMENTS, outputs.csv_bytes(
            ["path", "cluster", "distance"] + (["label"] if use_labels else []), zip(*cols)))
    elif (out / outputs.ASSIGNMENTS).exists():
        (out / outputs.ASSIGNMENTS).unlink()  # of an earlier, smaller run: never beside another run's parquet
    skipped = shards.skipped()
    atomic_write_bytes(out / outputs.SKIPPED, outputs.csv_bytes(["path", "reason"], skipped))
    model = shards.manifest.get("model") or {}
    source = shards.manifest.get("input") or {}
    kmeans = {**kinfo, "input": "L2-normalised embeddings", "distance": "euclidean, unit vector to its centroid"}
    summary = {  # the fields of itae-cluster's summary.json (docs/outputs.md), and the shard specifics
        "folder": (str(Path(source["location"]).parent) if source.get("kind") == "list" and source.get("location")
                   else source.get("location")),  # the folder the keys join (a list's: its own folder)
        "input": {"kind": source.get("kind"), "location": source.get("location")},
        "out_dir": str(out.resolve()),
        "onnx": model.get("onnx"),
        "model_id": model.get("id"),
        "model": model.get("name"),
        "itae": model.get("itae"),
        "precision": model.get("precision"),
        "preprocessing": model.get("preprocessing"),
        "embed_dim": shards.dim,
        "shards": str(Path(shard_dir).resolve()),
        "counts": {"found": n + len(skipped), "embedded": n, "embedded_new": None, "reused": None,
                   "skipped": len(skipped), "parts": len(shards.files), "parts_missing": len(shards.missing)},
        "method": "kmeans",
        "clustering": {"method": "kmeans", "name": "K-Means", "k": k, "seed": seed, **kmeans},
        "kmeans": kmeans,
        "cluster_sizes": sizes.tolist(),
        "timings": {"fit_s": round(t_fit, 3), "total_s": round(time.perf_counter() - t0, 3)},
    }
    summary["artifacts"] = _artifacts(shards, model)
    if use_labels:
        summary["labels"], summary["metrics"] = label_metrics(y, assign, k)
    atomic_write_json(out / outputs.SUMMARY, summary)
    return summary


# From this many images on, itae-cluster runs the sharded stages (itae-embed run + cluster) by itself:
# the in-memory job holds every vector at once (n x D float32: 0.6 GB at 200,000 x 768, plus
# embeddings.npy of the same size), the sharded stages hold one part (docs/scale.md).
SHARDED_MIN_IMAGES = 200_000
SHARD_DIR = "shards"  # inside itae-cluster's --out
IN_MEMORY_ONLY = {"protocol": "--protocol", "head_out": "--head-out",
                  "knn_reference": "--knn-reference", "compare_baseline": "--compare-baseline"}


def run_cluster(input_spec, onnx_path, k, out_dir=None, *, log: Callable[[str], None] | None = None,
                **options) -> dict:
    """itae-cluster: :func:`~itae_export.cluster.job.run_cluster_job` in memory below
    :data:`SHARDED_MIN_IMAGES` images; from there on (K-Means with an integer k) the sharded stages
    (``itae-embed run`` into ``OUT/shards/``, then :func:`cluster_shards` into ``OUT``), which
    write the same output set. Returns the summary."""
    log = log or (lambda m: None)
    if options.get("method", "kmeans") != "kmeans" or k == "auto" or not (fk.faiss_available() and _has_pyarrow()):
        return run_cluster_job(input_spec, onnx_path, k, out_dir, log=log, **options)
    out = Path(out_dir).resolve() if out_dir is not None else default_out_dir(Path(input_spec))
    inp = Path(input_spec).resolve()
    inside = out == inp or out in inp.parents  # --out is the input folder or above it: keep only shards/ out
    source = open_source(input_spec, "auto", DEFAULT_PART_SIZE, exclude=out / SHARD_DIR if inside else out)
    n = sum(p.n_items if p.n_items is not None else len(p.items()) for p in source.parts)
    blocked = [flag for name, flag in IN_MEMORY_ONLY.items() if options.get(name)]
    if n >= SHARDED_MIN_IMAGES and blocked:
        log(f"{n} images: {', '.join(blocked)} needs every vector in memory; not switching to the sharded stages")
    elif n >= SHARDED_MIN_IMAGES:
        return _run_sharded(input_spec, onnx_path, k, out, options, log)
    return run_cluster_job(input_spec, onnx_path, k, out_dir, log=log, **options)


def _has_pyarrow() -> bool:
    try:
        require_pyarrow("the sharded stages")
        return True
    except MissingDependencyError:
        return False


def _run_sharded(input_spec, onnx_path, k: int, out: Path, options: dict, log) -> dict:
    ClusterOptions(k=k, **options).check()
    ensure_dir(out)
    check_legacy_store(out)
    shard_dir = out / SHARD_DIR
    log(f"From {SHARDED_MIN_IMAGES} images on: the sharded stages (parts in {shard_dir}, faiss K-Means)")
    t0 = time.perf_counter()
    stats = embed_shards(input_spec, shard_dir, onnx_path, batch_size=options.get("batch_size"),
                         workers=options.get("workers"), device=options.get("device", "auto"),
                         intra_op_threads=options.get("intra_op_threads"), progress=options.get("progress", True),
                         max_pixels=options.get("max_pixels", DEFAULT_MAX_PIXELS), log=log)
    t_embed = time.perf_counter() - t0
    summary = cluster_shards(shard_dir, k, out, seed=options.get("seed", 0), n_init=options.get("n_init", 10),
                             use_labels=bool(options.get("use_labels")), log=log)
    new = stats.embedded - stats.reused
    summary["counts"].update(embedded_new=new, reused=stats.reused + stats.rows_resumed)
    summary["execution_provider"] = None  # the embed stage logged it
    summary["images_per_s"] = round(new / t_embed, 3) if new and t_embed > 0 else 0.0
    summary["timings"]["embed_s"] = round(t_embed, 4)
    atomic_write_json(out / outputs.SUMMARY, summary)
    return summary


def _sklearn(x, k, seed, n_init):
    """scikit-learn's K-Means asked for explicitly on a set above the faiss threshold."""
    from sklearn.cluster import KMeans

    xn = l2_normalize(x)
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(xn)
    labels = km.labels_.astype(np.int64)
    return labels, np.linalg.norm(xn - km.cluster_centers_[labels], axis=1), float(km.inertia_)


def _rows(pa, keys, lab, dist, schema, classes=None, y=None, at: int = 0):
    cols = {"key": keys, "cluster": pa.array(lab.astype(np.int32)), "distance": pa.array(dist.astype(np.float32))}
    if classes is not None:
        cols["label"] = pa.array(classes[y[at:at + len(lab)]].tolist(), pa.string())
    return pa.table(cols, schema=schema)


def _labels(shards) -> tuple[np.ndarray, np.ndarray]:
    """(class names sorted, each vector's class index int32): the parent folder of each key, as
    :func:`~itae_export.cluster.job.labels_from_dirs` reads it, one part at a time."""
    names: dict[str, int] = {}
    codes = []
    for f in shards.files:
        part = labels_from_dirs(read_part(f, columns=("key",))[0].column("key").to_pylist())
        codes.append(np.fromiter((names.setdefault(c, len(names)) for c in part), np.int32, len(part)))
    classes = np.array(sorted(names), dtype=object)
    rank = np.empty(len(names), np.int32)
    rank[[names[c] for c in classes]] = np.arange(len(names), dtype=np.int32)  # codes in sorted-name order
    y = rank[np.concatenate(codes)] if codes else np.zeros(0, np.int32)
    return classes, y


class _PartKeys:
    """The keys of a shard set by global row, read from their part on demand (never all at once)."""

    def __init__(self, shards):
        self.files = shards.files
        self.ends = np.cumsum(shards.counts)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int) -> str:
        p = int(np.searchsorted(self.ends, i, side="right"))
        start = int(self.ends[p - 1]) if p else 0
        return read_part(self.files[p], columns=("key",))[0].column("key")[int(i) - start].as_py()


def _artifacts(shards, model: dict) -> dict:
    """summary.json's ``artifacts`` block from the parts' per-image counts (:func:`cluster_artifacts`)."""
    num_tokens = model.get("num_tokens")
    if num_tokens is None and model.get("onnx") and Path(model["onnx"]).is_file():
        num_tokens = read_manifest(model["onnx"]).get("num_tokens")  # a shard manifest of an earlier version
    if num_tokens is None:
        return {"available": False, "reason": "the shard manifest does not record the model's token count",
                "warn_share": WARN_SHARE}
    old = [f.name for f in shards.files if part_artifacts(f, missing=None) is None]
    if old:
        return {"available": False, "reason": f"{len(old)} parts (e.g. {old[0]}) were written by an earlier version "
                                              "without the per-image counts; embed into a fresh --out to count them",
                "candidate_tokens_per_image": int(num_tokens) - 1, "warn_share": WARN_SHARE}
    res = SimpleNamespace(paths=_PartKeys(shards), artifact_counts=shards.artifacts())
    return cluster_artifacts(res, {"itae": model.get("itae"), "num_tokens": num_tokens})


def _means(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Mean of each cluster's L2-normalised vectors."""
    xn = fk.normalize_rows(x)
    c = np.zeros((k, x.shape[1]), np.float64)
    np.add.at(c, labels, xn)
    return (c / np.maximum(np.bincount(labels, minlength=k), 1)[:, None]).astype(np.float32)
