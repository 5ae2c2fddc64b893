"""The clustering job, stage by stage: scan, embed (resumably, :mod:`itae_export.data.embed`),
choose k, cluster (K-Means or a TSP/TEMI head), score against labels, write the outputs."""

from __future__ import annotations

import importlib.util
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from itae_export.data import outputs
from itae_export.data.embed import (
    EmbedResult,
    FolderScan,
    default_out_dir,
    embed_folder,
    embed_items,
    load_item,
    progress_bar,
)
from itae_export.data.sources import DEFAULT_PART_SIZE, Item, open_source, text_key
from itae_export.cluster.evaluation import (
    choose_k,
    head_advice,
    knn_accuracy,
    neighbour_label_consistency,
    over_clustering_scores,
)
from itae_export.cluster import faiss_kmeans as fk
from itae_export.cluster.artifacts import cluster_artifacts
from itae_export.cluster.baseline import baseline_block, embed_outputs
from itae_export.cluster.head_export import append_head, check_composed, export_head
from itae_export.cluster.heads import TEMI_DEFAULTS, TSP_DEFAULTS, fit_head
from itae_export.cluster.metrics import clustering_scores, l2_normalize, many_to_one_accuracy, paper_protocol
from itae_export.cluster.report import MAP_NAME, THUMBS_DIR
from itae_export.data.store import EmbeddingStore, check_legacy_store
from itae_export.errors import InputError, OptionError
from itae_export.files import atomic_write_bytes, ensure_dir
from itae_export.images import DEFAULT_MAX_PIXELS, PreprocessSpec
from itae_export.onnx.contract import MAX_BATCH
from itae_export.onnx.manifest import read_manifest
from itae_export.runtime import cap_threads, open_session

# ---------------------------------------------------------------- clustering


def _kmeans_threads(n: int):
    """One OpenMP thread below ~20k points: scikit-learn splits K-Means into chunks of 256 rows,
    and with few chunks the spinning OpenMP barriers cost far more than they save (measured 0.2 s
    with one thread against 3-5 s with two, for 300 points on a busy 2-core machine)."""
    import contextlib

    if n >= 20_000:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="openmp")


def kmeans_backend(n: int) -> str:
    """The K-Means that :func:`kmeans_assign` runs on ``n`` points: "faiss" from
    :data:`~itae_export.cluster.faiss_kmeans.FAISS_MIN_POINTS` on (where installed), else "sklearn"."""
    return "faiss" if n >= fk.FAISS_MIN_POINTS and fk.faiss_available() else "sklearn"


def kmeans_config(n: int, k: int, *, seed: int = 0, n_init: int = 10) -> dict:
    """How :func:`kmeans_assign` clusters ``n`` points (summary.json ``clustering``): the backend and its settings."""
    if kmeans_backend(n) == "faiss":
        return fk.config(fk.default_sample_size(n, k), k, seed=seed)
    return {"backend": "sklearn", "n_init": n_init, "seed": seed}


def kmeans_assign(embeddings: np.ndarray, k: int, *, seed: int = 0, n_init: int = 10):
    """K-Means on L2-normalised embeddings: (labels, distance of each point to its centroid, inertia).
    From FAISS_MIN_POINTS points on, spherical K-Means with faiss where it is installed
    (:func:`kmeans_config` says which, and with what settings)."""
    check_seed(seed)
    if kmeans_backend(len(embeddings)) == "faiss":
        return fk.faiss_kmeans_assign(embeddings, k, seed=seed)
    from sklearn.cluster import KMeans

    x = l2_normalize(embeddings)
    with _kmeans_threads(len(x)):
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    labels = km.labels_.astype(np.int64)
    dist = np.linalg.norm(x - km.cluster_centers_[labels], axis=1)
    return labels, dist, float(km.inertia_)


def labels_from_dirs(rel_paths: list[str]) -> list[str]:
    """ImageFolder labels: each image's parent folder name. Images at the root are an InputError."""
    at_root = [r for r in rel_paths if "/" not in r]
    if at_root:
        raise InputError(f"--labels-from-dirs: {len(at_root)} images lie directly in the folder, not in a "
                         f"class folder (e.g. {at_root[0]})")
    return [r.rsplit("/", 2)[-2] for r in rel_paths]


def label_metrics(y, assign: np.ndarray, k: int) -> tuple[dict, dict]:
    """summary.json's ``labels`` and ``metrics`` blocks for the parent-folder labels ``y``: ACC, NMI,
    ARI, many-to-one ACC and, when k exceeds the classes (Hungarian ACC cannot score it), over-clustering."""
    scores = clustering_scores(y, assign)
    scores["many_to_one_acc"] = many_to_one_accuracy(y, assign)
    n_classes = len(set(y.tolist() if isinstance(y, np.ndarray) else y))
    if k > n_classes:
        scores["over_clustering"] = over_clustering_scores(y, assign)
    return {"source": "parent folder names", "n_classes": n_classes}, scores


MAX_SEED = 2 ** 31 - 1  # sklearn takes 0..2**32-1, faiss a C int: the seeds both take


def check_seed(seed) -> None:
    """``--seed`` is an integer both K-Means backends take (-5 was sklearn's traceback after the embedding)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise OptionError(f"--seed: {seed!r} must be an integer between 0 and {MAX_SEED}")


def check_k(k, n: int | None = None, what: str = "images") -> None:
    """k is an integer >= 2 and, when ``n`` is given, at most ``n``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise OptionError(f"--k: {k!r} must be an integer >= 2")
    if n is not None and k > n:
        raise InputError(f"--k: {k} is more than the number of {what} ({n})")


@dataclass
class ClusterOptions:
    """Every option of a clustering job beyond the folder and the model; :meth:`check` runs before any work."""

    k: int | str = 10  # or "auto"
    seed: int = 0
    n_init: int = 10
    batch_size: int | None = None
    workers: int | None = None
    pool: str = "thread"
    device: str = "auto"
    intra_op_threads: int | None = None
    use_labels: bool = False
    protocol: str | None = None
    protocol_sets: int = 20
    protocol_runs: int = 25
    progress: bool = True
    method: str = "kmeans"
    k_max: int = 20
    k_criterion: str = "silhouette"
    head_params: dict | None = None
    head_out: str | os.PathLike | None = None
    knn_reference: str | os.PathLike | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    compare_baseline: bool = False  # also K-Means on the graph's embedding_unpatched (cluster/baseline.py)

    def check(self) -> None:
        for name, low, high in (("n_init", 1, MAX_N_INIT), ("intra_op_threads", 1, None), ("workers", 1, None),
                                ("batch_size", 1, MAX_BATCH), ("max_pixels", 1, None), ("protocol_sets", 1, None),
                                ("protocol_runs", 1, None)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low or (high and v > high)):
                flag = {"intra_op_threads": "threads", "protocol_sets": "sets", "protocol_runs": "runs"}.get(name, name)
                bound = f"between {low} and {high}" if high else f">= {low}"
                raise OptionError(f"--{flag.replace('_', '-')}: {v!r} must be an integer {bound}")
        check_seed(self.seed)
        epochs = (self.head_params or {}).get("epochs")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= MAX_EPOCHS):
            raise OptionError(f"--epochs: {epochs!r} must be an integer between 1 and {MAX_EPOCHS}")
        if self.method not in CLUSTER_METHODS:
            raise OptionError(f"--method: {self.method!r} is not one of {', '.join(CLUSTER_METHODS)}")
        if self.head_out is not None and self.method == "kmeans":
            raise OptionError("--head-out needs --method tsp or temi (K-Means has no head to export)")
        if self.knn_reference is not None and not self.use_labels:
            raise OptionError("--knn-reference scores against the true labels: add --labels-from-dirs")
        check_k(self.k_max if self.k == "auto" else self.k)  # the type and lower bound, before any work
        if self.protocol not in (None, "paper"):
            raise OptionError(f"--protocol: {self.protocol!r} is not 'paper'")
        if self.protocol and not self.use_labels:
            raise OptionError("--protocol paper needs the true labels: add --labels-from-dirs")
        if self.compare_baseline and self.method != "kmeans":
            raise OptionError("--compare-baseline compares K-Means on both embeddings: use --method kmeans")


@dataclass
class Clustering:
    """What a clustering method returns: labels, each point's distance to its centroid, the inertia."""

    labels: np.ndarray
    distances: np.ndarray
    inertia: float
    head: object = None  # the fitted TSP/TEMI head, if any
    advice: object = None  # the head's neighbour-consistency estimate (evaluation.head_advice)


def run_cluster_job(folder: str | os.PathLike, onnx_path: str | os.PathLike, k: int | str,
                    out_dir: str | os.PathLike | None = None, *, log: Callable[[str], None] | None = None,
                    **options) -> dict:
    """Embed ``folder`` (resumably, into the shared embedding cache), cluster it into ``k`` clusters and write
    assignments.csv, embeddings.npy, summary.json and skipped.csv atomically into ``out_dir``.

    ``options`` are the fields of :class:`ClusterOptions`: ``k="auto"`` picks k in 2..k_max by
    ``k_criterion``; ``method`` is kmeans, tsp or temi (a head trained on the embeddings, exported
    with ``head_out``). Returns the summary dictionary."""
    log = log or (lambda msg: None)
    opts = ClusterOptions(k=k, **options)
    opts.check()
    opts.intra_op_threads = cap_threads(opts.intra_op_threads, log)
    t_start = time.perf_counter()
    manifest = read_manifest(onnx_path)
    job, out_dir = _scan(folder, out_dir, opts)
    t_scan = time.perf_counter() - t_start
    session = open_session(onnx_path, opts.device, intra_op_threads=opts.intra_op_threads, spinning=False)
    log(f"Execution provider: {session.provider} ({session.reason})")
    with EmbeddingStore() as store:
        res = embed_items(job.items, onnx_path, root=job.root, manifest=manifest, store=store,
                           batch_size=opts.batch_size, workers=opts.workers, pool=opts.pool, progress=opts.progress,
                           session=session, max_pixels=opts.max_pixels, log=log,
                           **embed_outputs(opts.compare_baseline))
    if not res.paths:
        _write_skipped(out_dir, res)
        raise InputError(f"{folder}: none of the {res.n_found} images could be embedded (see {out_dir / 'skipped.csv'})")
    k, k_auto = _resolve_k(res, opts, log)
    t0 = time.perf_counter()
    clustering = cluster_embeddings(res.embeddings, k, opts, log)
    t_cluster = time.perf_counter() - t0

    summary = _summary(job.root, out_dir, onnx_path, manifest, res, opts, k, clustering)
    summary["input"] = job.source
    summary["artifacts"] = cluster_artifacts(res, manifest)  # flagged tokens per image (cluster/artifacts.py)
    columns = {"path": res.paths, "cluster": clustering.labels.tolist(),
               "distance": [f"{d:.6f}" for d in clustering.distances]}
    if opts.use_labels:
        columns["label"] = _score_labels(summary, res, clustering.labels, k, opts, onnx_path, out_dir, session, log)
    if opts.compare_baseline:  # the unpatched embeddings of the same pass, clustered the same way
        summary["baseline"] = baseline_block(res, manifest, onnx_path, clustering.labels, k,
                                             functools.partial(kmeans_assign, n_init=opts.n_init),
                                             y=columns.get("label"), seed=opts.seed)
    if k_auto is not None:
        summary["k_auto"] = k_auto
    if clustering.head is not None:
        summary["head"] = {"method": opts.method, "hparams": clustering.head.hparams,
                           "clusters_used": int(len(np.unique(clustering.labels))),
                           "schedule": clustering.head.schedule, "neighbour_advice": clustering.advice.as_dict()}
        if opts.head_out is not None:
            summary["head"].update(_export_head(clustering.head, res, job, onnx_path, Path(opts.head_out), manifest,
                                                log))
    summary["timings"] = {"scan_s": round(t_scan, 4), "embed_s": round(res.embed_seconds, 4),
                          "cluster_s": round(t_cluster, 4), "total_s": round(time.perf_counter() - t_start, 4)}
    summary["images_per_s"] = round(res.images_per_s, 3)
    _write_outputs(out_dir, res, columns, summary)
    return summary


@dataclass
class JobInput:
    """What a clustering job reads: the items of a folder, a list of paths or WebDataset tars (one
    source layer, :mod:`itae_export.data.sources`), and where they come from."""

    root: Path  # the folder, or the list's or tar's location
    items: list[Item]
    source: dict  # kind and location (summary.json ``input``)


def _scan(spec, out_dir, opts: ClusterOptions) -> tuple[JobInput, Path]:
    """The images of ``spec`` (none of the job's own outputs) and the output folder, created."""
    p = Path(spec)
    if not p.exists() and not ("{" in str(spec) and ".." in str(spec)):
        raise InputError(f"{spec}: no such file or folder")
    kind = "auto"
    if p.is_dir():
        kind = "webdataset" if any(e.name.endswith(".tar") and e.is_file() for e in os.scandir(p)) else "folder"
    root = p.resolve() if p.exists() else Path(os.path.abspath(spec))
    out_dir = Path(out_dir).resolve() if out_dir is not None else default_out_dir(root)
    if kind == "folder":
        scan = FolderScan.of(root, exclude=own_outputs(root, out_dir))
        job = JobInput(root, scan.items(), {"kind": "folder", "location": str(root)})
    else:
        src = open_source(spec, kind, DEFAULT_PART_SIZE, exclude=out_dir)
        # a list's keys are paths relative to its folder (or absolute): that folder is the root they join
        job = JobInput(root.parent if src.kind == "list" else root, [it for part in src.parts for it in part.items()],
                       {"kind": src.kind, "location": src.location})
    if not job.items:
        raise InputError(f"{spec}: no images found (looked recursively for common image extensions)")
    if opts.k != "auto":
        check_k(opts.k, len(job.items))
    if opts.use_labels:
        labels_from_dirs([it.key for it in job.items])  # fail now, not after embedding
    ensure_dir(out_dir)
    check_legacy_store(out_dir)
    return job, out_dir


def own_outputs(root: Path, out_dir: Path) -> list[Path]:
    """What the job writes that could look like input: an output folder inside the folder being
    clustered, or (when --out is that folder or a parent of it) the cache, thumbnails and map."""
    if out_dir != root and root in out_dir.parents:
        return [out_dir]
    return [out_dir / "cache", out_dir / THUMBS_DIR, out_dir / MAP_NAME]


def _resolve_k(res: EmbedResult, opts: ClusterOptions, log) -> tuple[int, dict | None]:
    """(k, the --k auto record or None); k checked against the images that decoded."""
    n = len(res.paths)
    if opts.k != "auto":
        check_k(opts.k, n, "images that could be decoded")
        return opts.k, None
    if n < 3:  # k = 2 .. n-1 must hold one k to compare; name no k the user never typed
        raise InputError(f"--k auto needs at least 3 images that could be decoded, not {n}; give --k N instead")
    top = min(opts.k_max, n - 1)
    with _kmeans_threads(n):
        k, curve = choose_k(res.embeddings, range(2, top + 1), criterion=opts.k_criterion, seed=opts.seed)
    log(f"--k auto: k={k} ({opts.k_criterion} over 2..{top})")
    return k, {"criterion": opts.k_criterion, "range": [2, top], "curve": {str(kk): v for kk, v in curve.items()},
               "chosen": k}


def cluster_embeddings(embeddings: np.ndarray, k: int, opts: ClusterOptions,
                       log: Callable[[str], None] = lambda m: None) -> Clustering:
    """K-Means on the L2-normalised embeddings, or a TSP/TEMI head trained on them (with a warning
    when the neighbours of the data say a head is unlikely to help)."""
    if opts.method == "kmeans":
        if kmeans_backend(len(embeddings)) == "faiss":
            log(f"K-Means: {len(embeddings)} vectors (>= {fk.FAISS_MIN_POINTS}): spherical K-Means with faiss "
                "(--n-init does not apply; summary.json clustering.backend)")
        return Clustering(*kmeans_assign(embeddings, k, seed=opts.seed, n_init=opts.n_init))
    params = dict(opts.head_params or {})
    hp = {**(TSP_DEFAULTS if opts.method == "tsp" else TEMI_DEFAULTS), **params}
    if hp["n_neighbors"] >= len(embeddings) and "n_neighbors" not in (opts.head_params or {}):
        params["n_neighbors"] = hp["n_neighbors"] = len(embeddings) - 1  # a small folder: every other image
        log(f"{opts.method.upper()}: {len(embeddings)} images, fewer than its default neighbours: using "
            f"{hp['n_neighbors']}")
    advice = head_advice(embeddings, k, opts.method, seed=opts.seed, graph_neighbors=hp["n_neighbors"])
    if advice.warning:
        log(advice.warning)
    head = fit_head(embeddings, k, opts.method, seed=opts.seed, progress=opts.progress, neighbors=advice.neighbors,
                    log=log, **params)
    labels = np.asarray(head.labels_)
    used = len(np.unique(labels))
    if used < k:
        log(f"warning: the {opts.method.upper()} head left {k - used} of the {k} clusters empty "
            "(summary.json: head.clusters_used); K-Means (--method kmeans) fills every cluster")
    return Clustering(labels, *centroid_distances(embeddings, labels), head=head, advice=advice)


def _summary(root: Path, out_dir: Path, onnx_path, manifest: dict, res: EmbedResult, opts: ClusterOptions, k: int,
             clustering: Clustering) -> dict:
    method = {"kmeans": "K-Means", "tsp": "TSP head", "temi": "TEMI head"}[opts.method]
    record = {"method": opts.method, "name": method, "k": k, "seed": opts.seed, "inertia": clustering.inertia,
              "input": "L2-normalised embeddings", "distance": "euclidean, to the mean of the assigned cluster"}
    if opts.method == "kmeans":
        record.update(kmeans_config(len(res.embeddings), k, seed=opts.seed, n_init=opts.n_init),
                      distance="euclidean, to the assigned centroid")
    return {
        "folder": str(root),
        "out_dir": str(out_dir),
        "onnx": str(Path(onnx_path).resolve()),
        "model_id": res.model_id,
        "model": manifest.get("model"),
        "itae": manifest.get("itae"),
        "precision": manifest.get("precision"),
        "preprocessing": manifest.get("preprocessing"),
        "embed_dim": int(res.embeddings.shape[1]),
        "execution_provider": res.provider,
        "device": opts.device,
        "counts": {"found": res.n_found, "embedded": len(res.paths), "embedded_new": res.n_new,
                   "reused": res.n_reused, "skipped": len(res.skipped)},
        "conversions": res.conversions,
        "method": opts.method,
        "clustering": record,
        "cluster_sizes": np.bincount(clustering.labels, minlength=k).tolist(),
        "batch_size": res.batch_size,
        "workers": res.workers,
        "pool": opts.pool,
    }


def _score_labels(summary: dict, res: EmbedResult, assign: np.ndarray, k: int, opts: ClusterOptions, onnx_path,
                  out_dir: Path, session, log) -> list[str]:
    """ACC/NMI/ARI against the parent-folder labels, and what goes with them; returns the labels."""
    y = labels_from_dirs(res.paths)
    summary["labels"], summary["metrics"] = label_metrics(y, assign, k)
    _label_evaluation(summary, res, y, assign, k, opts, onnx_path, out_dir, session, log)
    if opts.protocol == "paper":
        bar = progress_bar(opts.protocol_sets * opts.protocol_runs, opts.progress, "paper protocol")
        try:
            with _kmeans_threads(len(y)):
                summary["paper_protocol"] = paper_protocol(res.embeddings, y, k, sets=opts.protocol_sets,
                                                           runs=opts.protocol_runs, seed=opts.seed, progress=bar.update)
        finally:
            bar.close()
    return y


def _write_outputs(out_dir: Path, res: EmbedResult, columns: dict, summary: dict) -> None:
    """The output set, published as one (see :mod:`itae_export.data.outputs`)."""
    files = {
        outputs.EMBEDDINGS: outputs.npy_bytes(res.embeddings),
        outputs.ASSIGNMENTS: outputs.csv_bytes(list(columns), zip(*columns.values())),
        outputs.SKIPPED: outputs.csv_bytes(["path", "reason"], res.skipped),
    }
    if len(res.paths) >= outputs.PARQUET_MIN_ROWS and importlib.util.find_spec("pyarrow") is not None:
        files[outputs.ASSIGNMENTS_PARQUET] = _assignments_parquet(columns)
    outputs.publish(out_dir, files, summary)


def _assignments_parquet(columns: dict) -> bytes:
    """assignments.parquet as itae-embed cluster writes it: key, cluster int32, distance float32 (+ label)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = {"key": pa.array([text_key(p) for p in columns["path"]], pa.string()),
             "cluster": pa.array(np.asarray(columns["cluster"], np.int32)),
             "distance": pa.array(np.asarray(columns["distance"], np.float32))}
    if "label" in columns:
        table["label"] = pa.array(columns["label"], pa.string())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(table), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


CLUSTER_METHODS = ("kmeans", "tsp", "temi")
MAX_N_INIT = 1000  # K-Means restarts: beyond this, time grows with no gain
MAX_EPOCHS = 100_000  # --epochs of a clustering head: the defaults are 100-1,000 steps' worth
MAX_NITER = 10_000  # faiss K-Means iterations: it converges in tens


def centroid_distances(embeddings: np.ndarray, assign: np.ndarray) -> tuple[np.ndarray, float]:
    """Distance of each L2-normalised embedding to the mean of its cluster, and their squared sum."""

    x = l2_normalize(embeddings)
    centroids = np.zeros((assign.max() + 1, x.shape[1]))
    np.add.at(centroids, assign, x)
    centroids /= np.maximum(np.bincount(assign, minlength=len(centroids)), 1)[:, None]
    dist = np.linalg.norm(x - centroids[assign], axis=1)
    return dist, float((dist**2).sum())


def _label_evaluation(summary, res, y, assign, k, opts: ClusterOptions, onnx_path, out_dir, session, log) -> None:
    """Scores beyond ACC/NMI/ARI: over-clustering, neighbour label consistency, k-NN accuracy."""
    n = len(y)
    ks = tuple(kk for kk in (1, 5, 10, 20) if kk < n)
    if ks:
        summary["neighbour_label_consistency"] = {str(kk): v for kk, v in
                                                  neighbour_label_consistency(res.embeddings, y, ks).items()}
    if opts.knn_reference is None:
        return
    ref_root = Path(opts.knn_reference).resolve()
    with EmbeddingStore() as store:
        ref = embed_folder(ref_root, onnx_path, store=store, batch_size=opts.batch_size, workers=opts.workers,
                           pool=opts.pool, progress=opts.progress, session=session, model_id=res.model_id, log=log)
    if not ref.paths:
        raise InputError(f"--knn-reference: no decodable images in {opts.knn_reference}")
    ref_y = labels_from_dirs(ref.paths)
    summary["knn"] = {"reference": str(ref_root), "n_reference": len(ref.paths), "k": 10,
                      "vote": "weighted, exp(cos / 0.07)",
                      "accuracy": knn_accuracy(ref.embeddings, ref_y, res.embeddings, y, k=10)}


def _export_head(head_result, res, job: JobInput, onnx_path, head_out: Path, manifest: dict, log) -> dict:
    """The trained head as ONNX, and the encoder with the head appended, checked on real images."""

    if head_out.suffix != ".onnx":
        raise OptionError(f"--head-out: {head_out} must end with .onnx")
    export_head(head_result.head, res.embeddings.shape[1], head_out,
                metadata={"itae.head": head_result.method, "itae.encoder": manifest.get("model", "")})
    composed = head_out.with_name(head_out.stem + ".with_encoder.onnx")
    append_head(onnx_path, head_out, composed)
    pre = PreprocessSpec.from_manifest(manifest["preprocessing"])
    by_key = {it.key: it for it in job.items}
    sample = np.stack([load_item(by_key[p], pre, None)[0] for p in res.paths[:16]])
    check = check_composed(composed, head_result.head, sample)
    log(f"Head: {head_out}; encoder + head: {composed}")
    return {"onnx": str(head_out), "encoder_with_head": str(composed), "check": check}


def _write_skipped(out_dir: Path, res: EmbedResult) -> None:
    atomic_write_bytes(out_dir / outputs.SKIPPED, outputs.csv_bytes(["path", "reason"], res.skipped))


def metrics_line(m: dict) -> str:
    """The CLI's line of summary.json's ``metrics``."""
    return f"ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}  (vs parent folder names)"


def format_summary(summary: dict) -> str:
    """The few lines the CLI prints at the end."""
    c = summary["counts"]
    speed = f" at {summary['images_per_s']:.1f} images/s" if c["embedded_new"] else ""
    lines = [
        f"{c['embedded']} images: {c['embedded_new']} embedded, {c['reused']} reused (from the embedding cache) "
        f"on {summary.get('execution_provider') or 'ONNX Runtime'}{speed}",
        f"Clusters (k={summary['clustering']['k']}{', chosen by ' + summary['k_auto']['criterion'] if 'k_auto' in summary else ''}"
        f", {summary.get('method', 'kmeans')}): sizes {summary['cluster_sizes']}",
    ]
    if "metrics" in summary:
        lines.append(metrics_line(summary["metrics"]))
    if "over_clustering" in summary.get("metrics", {}):
        o = summary["metrics"]["over_clustering"]
        lines.append(f"Over-clustering: many-to-one ACC {o['many_to_one_acc']:.4f}  AMI {o['ami']:.4f}")
    if "knn" in summary:
        lines.append(f"10-NN accuracy against {summary['knn']['reference']}: {summary['knn']['accuracy']:.4f}")
    if "head" in summary and "encoder_with_head" in summary["head"]:
        lines.append(f"Encoder with head: {summary['head']['encoder_with_head']}")
    if "paper_protocol" in summary:
        p = summary["paper_protocol"]
        lines.append("Paper protocol ({sets} sets x {runs} runs): ".format(**p["protocol"]) + "  ".join(
            f"{key.upper()} {p[key]['mean']:.4f} ± {p[key]['se']:.4f}" for key in ("acc", "nmi", "ari")))
    lines.append(f"Skipped {c['skipped']} files" + (" (see skipped.csv)" if c["skipped"] else ""))
    lines.append(f"Outputs in {summary['out_dir']}")
    return "\n".join(lines)
