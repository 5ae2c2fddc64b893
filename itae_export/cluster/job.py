"""The clustering job: scan a folder, embed it with an exported model (resumably), K-Means, outputs.

``embed_folder`` is the reusable part (paths plus embeddings); ``run_cluster_job`` adds the
clustering, the metrics and the files in the output folder.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from itae_export.cluster.evaluation import choose_k, knn_accuracy, neighbour_label_consistency, over_clustering_scores
from itae_export.cluster.faiss_kmeans import FAISS_MIN_POINTS, faiss_available, faiss_kmeans_assign
from itae_export.cluster.head_export import append_head, check_composed, export_head
from itae_export.cluster.heads import fit_head
from itae_export.cluster.metrics import clustering_scores, l2_normalize, many_to_one_accuracy, paper_protocol
from itae_export.cluster.store import EmbeddingStore, file_key, model_fingerprint
from itae_export.errors import InputError
from itae_export.files import atomic_write_bytes, atomic_write_json
from itae_export.images import ImageDecodeError, PreprocessSpec, decode_image, load_image, preprocess, scan_images
from itae_export.onnx.manifest import read_manifest
from itae_export.runtime import Embedder, open_session, resolve_device

STORE_NAME = "cache/embeddings.sqlite"
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
    cores = os.cpu_count() or 1
    if provider == "CUDAExecutionProvider":
        return max(1, min(16, cores - 1))
    return max(1, min(4, cores - 1))


def default_batch_size(provider: str | None = None) -> int:
    """8 on CPU; 128 on a GPU, where larger batches keep the device busy.

    On the 2-core AVX2 machine of docs/performance.md, ViT-S/14 runs about 30% more images/s at
    batch 8 than at 32 (the activations of 8 images stay in cache): 7.5 against 5.9 images/s end to
    end in bench/bench_cluster.py."""
    return 128 if provider == "CUDAExecutionProvider" else 8


def _load_one(path: str, pre: PreprocessSpec):
    """Worker: (pixels [3,H,W] or None, reason or None, conversion notes)."""
    try:
        img, notes = decode_image(path)
        return preprocess(img, pre), None, notes
    except ImageDecodeError as e:
        return None, e.reason, []
    except Exception as e:  # noqa: BLE001 - one bad image must never stop the job
        return None, f"cannot decode: {type(e).__name__}: {e}", []


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def embed_folder(folder: str | os.PathLike, onnx_path: str | os.PathLike, *, paths: list[Path] | None = None,
                 store=None, batch_size: int | None = None, workers: int | None = None, pool: str = "thread",
                 device: str = "auto", intra_op_threads: int | None = None, progress: bool = True,
                 session=None, model_id: str | None = None, log: Callable[[str], None] | None = None) -> EmbedResult:
    """Embed every image under ``folder`` (or the given ``paths``) with an exported model.

    Rows found in ``store`` (an EmbeddingStore or a path to one) for this model and the same file
    size and mtime are reused; new rows are committed to it one batch at a time, so an
    interrupted run loses at most one batch. Bad images are skipped with a reason, never fatal.
    ``session`` is an optional ``(session, provider)`` from :func:`itae_export.runtime.open_session`;
    ``model_id`` the model's :func:`~itae_export.cluster.store.model_fingerprint` when already known.
    """

    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size: {batch_size} must be >= 1")
    if pool not in POOLS:
        raise InputError(f"--pool: {pool!r} is not one of {', '.join(POOLS)}")
    if workers is not None and workers < 1:
        raise InputError(f"--workers: {workers} must be >= 1")
    root = Path(os.path.abspath(folder))  # symlinks kept: an image's key is the path it was found at
    manifest = read_manifest(onnx_path)
    pre = PreprocessSpec.from_manifest(manifest.get("preprocessing"))
    if paths is None:
        paths = scan_images(root)
    paths = [Path(os.path.abspath(p)) for p in paths]
    rel = []
    for p in paths:
        try:
            rel.append(p.relative_to(root).as_posix())
        except ValueError:
            raise InputError(f"{p}: not inside the folder {root}") from None

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
        skipped: dict[str, str] = {}
        keys: dict[str, tuple[int, int]] = {}
        for r, p in zip(rel, paths):
            try:
                keys[r] = file_key(p)
            except OSError as e:
                skipped[r] = f"cannot stat: {e.strerror or e}"
        done = store.lookup(model_id, keys) if store is not None else {}
        todo = [(r, p) for r, p in zip(rel, paths) if r in keys and r not in done]
        n_reused = len(done)
        conversions: Counter = Counter()
        new_vecs: dict[str, np.ndarray] = {}
        if log and n_reused:
            log(f"Reusing {n_reused} stored embeddings; {len(todo)} images to embed")

        if todo:
            _run_pipeline(todo, pre, embed, store, model_id, keys, batch_size, workers, pool, progress,
                          new_vecs, skipped, conversions)
        embed_seconds = time.perf_counter() - t0
    finally:
        if own_store:
            store.close()

    vectors = {**done, **new_vecs}
    good = [r for r in rel if r in vectors]
    dim = next(iter(vectors.values())).shape[0] if vectors else int(manifest.get("embed_dim") or 0)
    emb = np.stack([vectors[r] for r in good]).astype(np.float32) if good else np.zeros((0, dim), np.float32)
    return EmbedResult(
        root=root, paths=good, embeddings=emb,
        skipped=[(r, skipped[r]) for r in rel if r in skipped],
        n_found=len(rel), n_new=len(new_vecs), n_reused=n_reused, provider=provider, model_id=model_id,
        embed_seconds=embed_seconds, batch_size=batch_size, workers=workers, conversions=dict(conversions),
    )


def _run_pipeline(todo, pre, embed, store, model_id, keys, batch_size, workers, pool, progress,
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
    bar = _progress_bar(len(todo), progress, "embedding")
    try:
        def fill() -> None:
            while len(pending) < ahead:
                nxt = next(it, None)
                if nxt is None:
                    return
                pending.append((nxt[0], ex.submit(_load_one, str(nxt[1]), pre)))

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
            if store is not None:
                store.add(model_id, [(r, *keys[r]) for r in batch_rel], vecs)
            for r, v in zip(batch_rel, vecs):
                new_vecs[r] = v
            bar.update(len(batch_rel))
    finally:
        bar.close()
        ex.shutdown(wait=True, cancel_futures=True)


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


def kmeans_assign(embeddings: np.ndarray, k: int, *, seed: int = 0, n_init: int = 10):
    """K-Means on L2-normalised embeddings: (labels, distance of each point to its centroid, inertia).
    From FAISS_MIN_POINTS points on, spherical K-Means with faiss where it is installed."""
    if len(embeddings) >= FAISS_MIN_POINTS and faiss_available():
        return faiss_kmeans_assign(embeddings, k, seed=seed)
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


def _csv_bytes(header: list[str], rows) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def check_k(k, n: int | None = None, what: str = "images") -> None:
    """k is an integer >= 2 and, when ``n`` is given, at most ``n``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise InputError(f"--k: {k!r} must be an integer >= 2")
    if n is not None and k > n:
        raise InputError(f"--k: {k} is more than the number of {what} ({n})")


def run_cluster_job(folder: str | os.PathLike, onnx_path: str | os.PathLike, k: int,
                    out_dir: str | os.PathLike | None = None, *, seed: int = 0, n_init: int = 10,
                    batch_size: int | None = None, workers: int | None = None, pool: str = "thread", device: str = "auto",
                    intra_op_threads: int | None = None, use_labels: bool = False, protocol: str | None = None,
                    protocol_sets: int = 20, protocol_runs: int = 25, progress: bool = True,
                    method: str = "kmeans", k_max: int = 20, k_criterion: str = "silhouette",
                    head_params: dict | None = None, head_out: str | os.PathLike | None = None,
                    knn_reference: str | os.PathLike | None = None,
                    log: Callable[[str], None] | None = None) -> dict:
    """Embed ``folder`` (resumably, cache in ``out_dir``), cluster it into ``k`` clusters and write
    assignments.csv, embeddings.npy, summary.json and skipped.csv atomically into ``out_dir``.

    ``k="auto"`` picks k in 2..k_max by ``k_criterion``; ``method`` is kmeans, tsp or temi (a head
    trained on the embeddings, exported with ``head_out``). Returns the summary dictionary."""

    log = log or (lambda msg: None)
    t_start = time.perf_counter()
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{folder}: no such folder" if not root.exists() else f"{folder}: not a folder")
    root = root.resolve()
    if method not in CLUSTER_METHODS:
        raise InputError(f"--method: {method!r} is not one of {', '.join(CLUSTER_METHODS)}")
    if head_out is not None and method == "kmeans":
        raise InputError("--head-out needs --method tsp or temi (K-Means has no head to export)")
    if knn_reference is not None and not use_labels:
        raise InputError("--knn-reference scores against the true labels: add --labels-from-dirs")
    if k == "auto":
        check_k(k_max)
    else:
        check_k(k)  # the type and lower bound, before any work
    if protocol not in (None, "paper"):
        raise InputError(f"--protocol: {protocol!r} is not 'paper'")
    if protocol and not use_labels:
        raise InputError("--protocol paper needs the true labels: add --labels-from-dirs")
    manifest = read_manifest(onnx_path)
    out_dir = Path(out_dir).resolve() if out_dir is not None else default_out_dir(root)

    paths = [p for p in scan_images(root) if out_dir not in p.resolve().parents]
    t_scan = time.perf_counter() - t_start
    if not paths:
        raise InputError(f"{folder}: no images found (looked recursively for common image extensions)")
    if k != "auto":
        check_k(k, len(paths))
    rel_all = [p.relative_to(root).as_posix() for p in paths]
    if use_labels:
        labels_from_dirs(rel_all)  # fail now, not after embedding
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out: {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    provider_wanted, why = resolve_device(device)
    session = open_session(onnx_path, device, intra_op_threads=intra_op_threads, spinning=False)
    if session[1] != provider_wanted:
        why = f"{provider_wanted} did not load"
    log(f"Execution provider: {session[1]} ({why})")
    with EmbeddingStore(out_dir / STORE_NAME) as store:
        res = embed_folder(root, onnx_path, paths=paths, store=store, batch_size=batch_size, workers=workers,
                           pool=pool, device=device, progress=progress, session=session, log=log)
    n = len(res.paths)
    if n == 0:
        _write_skipped(out_dir, res)
        raise InputError(f"{folder}: none of the {res.n_found} images could be decoded (see {out_dir / 'skipped.csv'})")
    k_auto = None
    if k == "auto":
        top = min(k_max, n - 1)
        check_k(top, n - 1, "images that could be decoded, minus one")
        with _kmeans_threads(n):
            k, curve = choose_k(res.embeddings, range(2, top + 1), criterion=k_criterion, seed=seed)
        k_auto = {"criterion": k_criterion, "range": [2, top], "curve": {str(kk): v for kk, v in curve.items()},
                  "chosen": k}
        log(f"--k auto: k={k} ({k_criterion} over 2..{top})")
    check_k(k, n, "images that could be decoded")

    t0 = time.perf_counter()
    head_result = None
    if method == "kmeans":
        assign, dist, inertia = kmeans_assign(res.embeddings, k, seed=seed, n_init=n_init)
    else:
        head_result = fit_head(res.embeddings, k, method, seed=seed, progress=progress, **(head_params or {}))
        assign = np.asarray(head_result.labels_)
        dist, inertia = centroid_distances(res.embeddings, assign)
    t_cluster = time.perf_counter() - t0

    summary: dict = {
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
        "device": device,
        "counts": {"found": res.n_found, "embedded": n, "embedded_new": res.n_new, "reused": res.n_reused,
                   "skipped": len(res.skipped)},
        "conversions": res.conversions,
        "method": method,
        "kmeans": {"k": k, "seed": seed, "n_init": n_init, "inertia": inertia,
                   "input": "L2-normalised embeddings", "distance": "euclidean, to the assigned centroid"},
        "cluster_sizes": np.bincount(assign, minlength=k).tolist(),
        "batch_size": res.batch_size,
        "workers": res.workers,
        "pool": pool,
    }
    header = ["path", "cluster", "distance"]
    cols = [res.paths, assign.tolist(), [f"{d:.6f}" for d in dist]]
    if use_labels:
        y = labels_from_dirs(res.paths)
        scores = clustering_scores(y, assign)
        scores["many_to_one_acc"] = many_to_one_accuracy(y, assign)
        summary["labels"] = {"source": "parent folder names", "n_classes": len(set(y))}
        summary["metrics"] = scores
        _label_evaluation(summary, res, y, assign, k, knn_reference, onnx_path, out_dir, batch_size, workers, pool, device,
                          progress, session, log)
        header.append("label")
        cols.append(y)
        if protocol == "paper":
            bar = _progress_bar(protocol_sets * protocol_runs, progress, "paper protocol")
            try:
                with _kmeans_threads(n):
                    summary["paper_protocol"] = paper_protocol(res.embeddings, y, k, sets=protocol_sets,
                                                               runs=protocol_runs, seed=seed, progress=bar.update)
            finally:
                bar.close()

    if k_auto is not None:
        summary["k_auto"] = k_auto
    if head_result is not None:
        summary["head"] = {"method": method, "hparams": head_result.hparams,
                           "clusters_used": int(len(np.unique(assign)))}
        if head_out is not None:
            summary["head"].update(_export_head(head_result, res, root, onnx_path, Path(head_out), manifest, log))

    # embeddings.npy first, assignments.csv next, summary.json last: summary marks a complete set
    atomic_write_bytes(out_dir / "embeddings.npy", _npy_bytes(res.embeddings))
    atomic_write_bytes(out_dir / "assignments.csv", _csv_bytes(header, zip(*cols)))
    _write_skipped(out_dir, res)
    total = time.perf_counter() - t_start
    summary["timings"] = {"scan_s": round(t_scan, 4), "embed_s": round(res.embed_seconds, 4),
                          "cluster_s": round(t_cluster, 4), "total_s": round(total, 4)}
    summary["images_per_s"] = round(res.images_per_s, 3)
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


CLUSTER_METHODS = ("kmeans", "tsp", "temi")


def centroid_distances(embeddings: np.ndarray, assign: np.ndarray) -> tuple[np.ndarray, float]:
    """Distance of each L2-normalised embedding to the mean of its cluster, and their squared sum."""

    x = l2_normalize(embeddings)
    centroids = np.zeros((assign.max() + 1, x.shape[1]))
    np.add.at(centroids, assign, x)
    centroids /= np.maximum(np.bincount(assign, minlength=len(centroids)), 1)[:, None]
    dist = np.linalg.norm(x - centroids[assign], axis=1)
    return dist, float((dist**2).sum())


def _label_evaluation(summary, res, y, assign, k, knn_reference, onnx_path, out_dir, batch_size, workers, pool, device,
                      progress, session, log) -> None:
    """Scores beyond ACC/NMI/ARI: over-clustering, neighbour label consistency, k-NN accuracy."""

    if k > summary["labels"]["n_classes"]:  # Hungarian ACC cannot score over-clustering
        summary["metrics"]["over_clustering"] = over_clustering_scores(y, assign)
    n = len(y)
    ks = tuple(kk for kk in (1, 5, 10, 20) if kk < n)
    if ks:
        summary["neighbour_label_consistency"] = {str(kk): v for kk, v in
                                                  neighbour_label_consistency(res.embeddings, y, ks).items()}
    if knn_reference is not None:
        ref_root = Path(knn_reference).resolve()
        with EmbeddingStore(out_dir / "cache" / "reference.sqlite") as store:
            ref = embed_folder(ref_root, onnx_path, store=store, batch_size=batch_size, workers=workers, pool=pool,
                               device=device, progress=progress, session=session, model_id=res.model_id, log=log)
        if not ref.paths:
            raise InputError(f"--knn-reference: no decodable images in {knn_reference}")
        ref_y = labels_from_dirs(ref.paths)
        summary["knn"] = {"reference": str(ref_root), "n_reference": len(ref.paths), "k": 10,
                          "vote": "weighted, exp(cos / 0.07)",
                          "accuracy": knn_accuracy(ref.embeddings, ref_y, res.embeddings, y, k=10)}


def _export_head(head_result, res, root: Path, onnx_path, head_out: Path, manifest: dict, log) -> dict:
    """The trained head as ONNX, and the encoder with the head appended, checked on real images."""

    if head_out.suffix != ".onnx":
        raise InputError(f"--head-out: {head_out} must end with .onnx")
    export_head(head_result.head, res.embeddings.shape[1], head_out,
                metadata={"itae.head": head_result.method, "itae.encoder": manifest.get("model", "")})
    composed = head_out.with_name(head_out.stem + ".with_encoder.onnx")
    append_head(onnx_path, head_out, composed)
    pre = manifest["preprocessing"]
    sample = np.stack([load_image(root / p, pre) for p in res.paths[:16]])
    check = check_composed(composed, head_result.head, sample)
    log(f"Head: {head_out}; encoder + head: {composed}")
    return {"onnx": str(head_out), "encoder_with_head": str(composed), "check": check}


def _write_skipped(out_dir: Path, res: EmbedResult) -> None:
    atomic_write_bytes(out_dir / "skipped.csv", _csv_bytes(["path", "reason"], res.skipped))


def format_summary(summary: dict) -> str:
    """The few lines the CLI prints at the end."""
    c = summary["counts"]
    speed = f" at {summary['images_per_s']:.1f} images/s" if c["embedded_new"] else ""
    lines = [
        f"Embedded {c['embedded']} images ({c['embedded_new']} new, {c['reused']} reused) "
        f"on {summary['execution_provider']}{speed}",
        f"Clusters (k={summary['kmeans']['k']}{', chosen by ' + summary['k_auto']['criterion'] if 'k_auto' in summary else ''}"
        f", {summary.get('method', 'kmeans')}): sizes {summary['cluster_sizes']}",
    ]
    if "metrics" in summary:
        m = summary["metrics"]
        lines.append(f"ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}  (vs parent folder names)")
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
