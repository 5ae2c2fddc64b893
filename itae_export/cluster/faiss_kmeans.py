"""Spherical K-Means with faiss for large jobs: an explicit training sample, then chunked assignment.

faiss trains on at most ``max_points_per_centroid * k`` points (256 k by default) and samples them
itself; here the sample is drawn by us, its size is a parameter (``sample_size``) recorded in the
outputs, and faiss is told not to subsample it again. The vectors are L2-normalised chunk by chunk
(never all at once), the centroids are kept on the unit sphere (``spherical=True``), and every
vector is then assigned to the centroid of highest cosine, ``chunk`` rows at a time. Memory beyond
the vectors themselves: the normalised sample, one normalised chunk and the labels.

Below :data:`FAISS_MIN_POINTS` scikit-learn's K-Means (k-means++, ``n_init`` restarts) stays the
default: it is fast enough there and its restarts make it the steadier of the two on small sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from itae_export.errors import InputError, MissingDependencyError

# Above this many points kmeans_assign switches to faiss (where installed). Measured with
# bench/bench_scale.py faiss-crossover on the 2-core AVX2 machine (docs/scale.md): faiss (20
# iterations, 1 redo) against scikit-learn (n_init=10) on 384-d data, k = 10.
FAISS_MIN_POINTS = 20_000
DEFAULT_NITER = 20
SAMPLE_PER_CENTROID = 256
MIN_SAMPLE = 65_536
ASSIGN_CHUNK = 65_536
SEEDINGS = 3  # k-means++ seedings, the best kept
# k-means++ seeds on a subsample: 50 points per centroid, between 5,000 and 20,000 (bench_scale.py faiss100k)
SEED_POINTS_PER_CENTROID = 50
MIN_SEED_POINTS = 5_000
MAX_SEED_POINTS = 20_000


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError("faiss K-Means needs faiss: pip install -e '.[scale]' in the itae-export clone (faiss-cpu)") from None
    return faiss


def default_sample_size(n: int, k: int) -> int:
    """min(n, max(256 k, 65,536)): faiss's own cap per centroid, but never fewer than 65,536 points."""
    return int(min(n, max(SAMPLE_PER_CENTROID * k, MIN_SAMPLE)))


def normalize_rows(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    """``x`` with unit rows (zero rows stay zero): a float32 copy, or ``x`` itself when ``inplace``
    (it must then be a C-contiguous float32 array)."""
    if inplace and not (x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable):
        raise ValueError("normalize_rows(inplace=True) needs a writeable C-contiguous float32 array")
    x = x if inplace else np.array(x, dtype=np.float32, copy=True)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(n, 1e-12)
    return x


@dataclass
class SphericalKMeans:
    """Centroids [k, D] (unit rows) and how they were trained."""

    centroids: np.ndarray
    k: int
    sample_size: int
    niter: int
    nredo: int
    seed: int
    objective: float  # faiss's final objective: the sum of cosines of the sample to its centroids

    def summary(self) -> dict:
        return {**config(self.sample_size, self.k, niter=self.niter, nredo=self.nredo, seed=self.seed), "k": self.k}


def config(sample_size: int, k: int, *, niter: int = DEFAULT_NITER, nredo: int = 1, seed: int = 0) -> dict:
    """How :func:`train` clusters (summary.json): the one description of the faiss settings."""
    return {"backend": "faiss", "spherical": True, "sample_size": int(sample_size), "niter": int(niter),
            "nredo": int(nredo), "seeding": f"k-means++, best of {SEEDINGS}",
            "seeding_points": min(int(sample_size), seeding_points(k)), "seed": int(seed)}


def train(sample: np.ndarray, k: int, *, niter: int = DEFAULT_NITER, nredo: int = 1, seed: int = 0,
          threads: int | None = None, inplace: bool = False) -> SphericalKMeans:
    """Train on ``sample`` [m, D] (normalised here, in place with ``inplace``: no second copy of the
    sample); faiss is told to use all m points."""
    faiss = _faiss()
    if k < 2 or k > len(sample):
        raise InputError(f"--k: {k} must be between 2 and the training sample size ({len(sample)})")
    if threads:
        faiss.omp_set_num_threads(int(threads))
    xs = normalize_rows(sample, inplace=inplace)
    km = faiss.Kmeans(xs.shape[1], int(k), niter=int(niter), nredo=int(nredo), spherical=True, seed=int(seed),
                      verbose=False, max_points_per_centroid=int(np.ceil(len(xs) / k)) + 1, min_points_per_centroid=1)
    km.train(xs, init_centroids=kmeans_plus_plus(xs, k, seed=seed, seedings=SEEDINGS))
    obj = float(km.obj[-1]) if len(km.obj) else float("nan")
    return SphericalKMeans(np.array(km.centroids, np.float32), int(k), len(xs), int(niter), int(nredo), int(seed), obj)


def seeding_points(k: int) -> int:
    """How many points k-means++ seeds on: 50 per centroid, at least 5,000 and at most 20,000."""
    return int(min(max(SEED_POINTS_PER_CENTROID * k, MIN_SEED_POINTS), MAX_SEED_POINTS))


def kmeans_plus_plus(xs: np.ndarray, k: int, *, seed: int = 0, seedings: int = SEEDINGS, candidates: int | None = None,
                     max_points: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding (as scikit-learn's: 2 + log k candidates a step) on at most
    ``max_points`` (default :func:`seeding_points`) unit rows of ``xs``, the best (lowest
    potential) of ``seedings`` tries.

    faiss starts from k random points, which on well-separated data often puts two seeds in one
    cluster and none in another, a merge that Lloyd's iterations never undo; k-means++ rarely does,
    and the best of a few seedings more rarely still (scikit-learn gets the same from n_init).
    The seedings run side by side: each step scores the candidates of all of them in one pass over
    the points, which is what a step costs (the pass is memory-bound), so 3 seedings cost about
    what one does."""
    rng = np.random.default_rng(seed)
    cap = max(seeding_points(k) if max_points is None else int(max_points), k)
    pts = xs if len(xs) <= cap else xs[np.sort(rng.choice(len(xs), cap, replace=False))]
    centres, pot = _seed_many(pts, k, rng, candidates or 2 + int(np.log(k)), max(1, int(seedings)))
    return centres[int(np.argmin(pot))]


def _seed_many(pts: np.ndarray, k: int, rng, trials: int, seedings: int) -> tuple[np.ndarray, np.ndarray]:
    """``seedings`` independent greedy k-means++ runs at once: (centres [S, k, D], potentials [S])."""
    m = len(pts)
    centres = np.empty((seedings, k, pts.shape[1]), np.float32)
    first = rng.integers(m, size=seedings)
    centres[:, 0] = pts[first]
    d2 = np.maximum(2.0 - 2.0 * (pts @ centres[:, 0].T), 0.0).T  # [S, m]
    rows = np.arange(seedings)
    for c in range(1, k):
        cand = np.empty((seedings, trials), np.int64)
        for s in range(seedings):
            total = float(d2[s].sum())
            if total <= 0:
                cand[s] = rng.integers(m, size=trials)
            else:
                cand[s] = np.minimum(np.searchsorted(np.cumsum(d2[s]), rng.random(trials) * total), m - 1)
        sims = pts @ pts[cand.ravel()].T  # [m, S * trials]: the one pass over the points
        nd2 = np.maximum(2.0 - 2.0 * sims.T.reshape(seedings, trials, m), 0.0)
        nd2 = np.minimum(nd2, d2[:, None, :])  # [S, trials, m]
        best = np.argmin(nd2.sum(axis=2), axis=1)  # [S]
        centres[:, c] = pts[cand[rows, best]]
        d2 = nd2[rows, best]
    return centres, d2.sum(axis=1, dtype=np.float64)


def assign(chunks: Iterable[np.ndarray], centroids: np.ndarray, chunk: int = ASSIGN_CHUNK,
           threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64 [n], Euclidean distance of each unit vector to its unit centroid [n]) over all chunks,
    each normalised and searched ``chunk`` rows at a time."""
    faiss = _faiss()
    if threads:
        faiss.omp_set_num_threads(int(threads))
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    labels, dists = [], []
    for block in chunks:
        for s in range(0, len(block), chunk):
            xs = normalize_rows(block[s:s + chunk])
            sim, idx = index.search(xs, 1)
            labels.append(idx[:, 0].astype(np.int64))
            # |x - c|^2 = 2 - 2 cos for unit x and c (a zero row has |x - c| = 1)
            zero = ~xs.any(axis=1)
            d2 = np.where(zero, 1.0, np.maximum(2.0 - 2.0 * sim[:, 0].astype(np.float64), 0.0))
            dists.append(np.sqrt(d2))
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(labels), np.concatenate(dists)


def sample_rows(parts: list[np.ndarray] | Callable[[], Iterable[np.ndarray]], counts: list[int], size: int,
                seed: int = 0) -> np.ndarray:
    """``size`` rows drawn uniformly without replacement from the concatenation of parts, gathered one
    part at a time (``parts`` may be a callable that yields them, so they need not all be open)."""
    n = int(sum(counts))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=min(size, n), replace=False))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    out, at = None, 0
    for i, block in enumerate(parts() if callable(parts) else parts):
        sel = pick[(pick >= bounds[i]) & (pick < bounds[i + 1])] - bounds[i]
        if out is None:
            out = np.empty((len(pick), block.shape[1]), np.float32)
        out[at:at + len(sel)] = block[sel]
        at += len(sel)
    return out


def faiss_kmeans_assign(embeddings: np.ndarray, k: int, *, seed: int = 0, sample_size: int | None = None,
                        niter: int = DEFAULT_NITER, nredo: int = 1, chunk: int = ASSIGN_CHUNK):
    """The faiss counterpart of :func:`itae_export.cluster.job.kmeans_assign`: (labels, distances, inertia)."""
    n = len(embeddings)
    size = sample_size or default_sample_size(n, k)
    own = size < n
    sample = sample_rows([embeddings], [n], size, seed) if own else embeddings
    model = train(sample, k, niter=niter, nredo=nredo, seed=seed, inplace=own)
    del sample
    labels, dist = assign([embeddings], model.centroids, chunk)
    return labels, dist, float((dist ** 2).sum())
