"""Evaluation of embeddings beyond clustering ACC: k-NN accuracy, neighbour label consistency,
over-clustering scores, and choosing the number of clusters.

* :func:`knn_accuracy` is the weighted k-NN classifier of DINO (and of the ITAE paper's Table 3):
  cosine similarity on L2-normalised embeddings, k=10, each of the k neighbours votes for its
  label with weight exp(cos / T), T=0.07; the class with the largest summed weight wins.
  ``weighted=False`` gives a plain majority vote (ties to the smallest label).
* :func:`neighbour_label_consistency` is TSP's Fig. 1: the fraction of the K nearest neighbours
  (cosine, the query excluded) that share the query's label, averaged over queries.
* :func:`over_clustering_scores` scores k > number of classes: many-to-one accuracy (each cluster
  takes its majority class) and AMI, both of which do not penalise splitting a class.
* :func:`head_advice` estimates without labels whether a TSP/TEMI head can help (K-Means labels
  in place of true ones in the neighbour consistency) and words a warning when it cannot.
* :func:`choose_k` picks k by the mean silhouette of K-Means (cosine) or by the largest eigengap
  of the normalised Laplacian of a symmetric k-NN graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from itae_export.cluster.heads import nearest_neighbors
from itae_export.cluster.metrics import l2_normalize, many_to_one_accuracy
from itae_export.errors import InputError


def knn_predict(train_emb, train_labels, test_emb, *, k: int = 10, temperature: float = 0.07,
                weighted: bool = True, batch: int = 1024) -> np.ndarray:
    """Labels predicted for ``test_emb`` by a k-NN vote over ``train_emb`` (see module doc)."""
    tr = l2_normalize(train_emb).astype(np.float32)
    te = l2_normalize(test_emb).astype(np.float32)
    classes, y = np.unique(np.asarray(train_labels), return_inverse=True)
    if len(tr) != len(y):
        raise InputError(f"{len(tr)} train embeddings but {len(y)} train labels")
    if not 1 <= k <= len(tr):
        raise InputError(f"k must be between 1 and the number of train embeddings ({len(tr)}), got {k}")
    out = np.empty(len(te), dtype=np.int64)
    for s in range(0, len(te), batch):
        sim = te[s:s + batch] @ tr.T
        nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        nn_sim = np.take_along_axis(sim, nn, axis=1).astype(np.float64)
        w = np.exp(nn_sim / temperature) if weighted else np.ones_like(nn_sim)
        votes = np.zeros((len(nn), len(classes)))
        np.add.at(votes, (np.repeat(np.arange(len(nn)), k), y[nn].ravel()), w.ravel())
        out[s:s + batch] = votes.argmax(axis=1)
    return classes[out]


def knn_accuracy(train_emb, train_labels, test_emb, test_labels, *, k: int = 10, temperature: float = 0.07,
                 weighted: bool = True) -> float:
    """Top-1 accuracy of :func:`knn_predict` (DINO's weighted 10-NN, T=0.07, by default)."""
    pred = knn_predict(train_emb, train_labels, test_emb, k=k, temperature=temperature, weighted=weighted)
    test_labels = np.asarray(test_labels)
    if len(pred) != len(test_labels):
        raise InputError(f"{len(pred)} test embeddings but {len(test_labels)} test labels")
    return float((pred == test_labels).mean())


def neighbour_label_consistency(embeddings, labels, ks=(1, 5, 10, 20, 50)) -> dict[int, float]:
    """{K: mean fraction of a point's K nearest neighbours (cosine, itself excluded) sharing its label}."""

    labels = np.asarray(labels)
    ks = sorted(int(k) for k in ks)
    _, idx = nearest_neighbors(l2_normalize(embeddings), ks[-1])
    same = labels[idx] == labels[:, None]
    return {k: float(same[:, :k].mean()) for k in ks}


def over_clustering_scores(y_true, y_pred) -> dict[str, float]:
    """Scores that allow more clusters than classes: many-to-one ACC, AMI (and NMI, ARI for reference)."""
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

    return {
        "many_to_one_acc": many_to_one_accuracy(y_true, y_pred),
        "ami": float(adjusted_mutual_info_score(y_true, y_pred)),
        "nmi": float(normalized_mutual_info_score(y_true, y_pred)),
        "ari": float(adjusted_rand_score(y_true, y_pred)),
        "n_clusters": int(len(np.unique(y_pred))),
        "n_classes": int(len(np.unique(y_true))),
    }


def choose_k(embeddings, k_range=range(2, 21), criterion: str = "silhouette", seed: int = 0, *,
             max_points: int = 3000, n_neighbors: int = 10) -> tuple[int, dict[int, float]]:
    """Pick the number of clusters; returns (best_k, {k: score}) with higher score = better.

    * ``silhouette``: K-Means (n_init=4) on L2-normalised embeddings for each k; score is the
      mean silhouette with the cosine metric.
    * ``eigengap``: eigenvalues l_1 <= l_2 <= ... of the symmetric normalised Laplacian of the
      union k-NN graph (``n_neighbors``, cosine); score of k is the gap l_{k+1} - l_k.

    Above ``max_points`` a random subset (fixed by ``seed``) is used.
    """
    x = l2_normalize(embeddings).astype(np.float32)
    ks = sorted(int(k) for k in k_range)
    if not ks or ks[0] < 2:
        raise InputError(f"k_range must hold values >= 2, got {list(k_range)}")
    if len(x) > max_points:
        x = x[np.random.default_rng(seed).choice(len(x), max_points, replace=False)]
    if ks[-1] >= len(x):
        raise InputError(f"k_range goes up to {ks[-1]} but there are only {len(x)} embeddings")
    if not np.isfinite(x).all():
        raise InputError("--k auto: some embeddings are not finite numbers (NaN or inf)")
    distinct = len(np.unique(x, axis=0))
    if distinct < 3:
        raise InputError(f"--k auto: the {len(x)} images have only {distinct} distinct embedding"
                         f"{'s' if distinct != 1 else ''} (identical images?), too few to compare numbers of "
                         "clusters; give --k N instead")
    ks = [k for k in ks if k < distinct]  # more clusters than distinct points leaves some empty
    if criterion == "silhouette":
        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score

        curve = {}
        for k in ks:
            pred = KMeans(k, n_init=4, random_state=seed).fit_predict(x)
            curve[k] = float(silhouette_score(x, pred, metric="cosine"))
    elif criterion == "eigengap":
        curve = _eigengap_curve(x, ks, n_neighbors)
    else:
        raise InputError(f"unknown criterion {criterion!r}; choose 'silhouette' or 'eigengap'")
    curve = {k: (v if np.isfinite(v) else float("-inf")) for k, v in curve.items()}
    best = max(curve, key=lambda k: (curve[k], -k))
    return best, curve


def _eigengap_curve(x: np.ndarray, ks: list[int], n_neighbors: int) -> dict[int, float]:
    import scipy.sparse as sp
    from scipy.sparse.csgraph import laplacian


    n = len(x)
    dist, idx = nearest_neighbors(x, min(n_neighbors, n - 1))
    # Gaussian affinity with a per-point scale (the distance to the k-th neighbour).
    sigma = np.maximum(dist[:, -1], 1e-8)
    w = np.exp(-(dist ** 2) / (sigma[:, None] * sigma[idx]))
    a = sp.csr_matrix((w.ravel(), (np.repeat(np.arange(n), idx.shape[1]), idx.ravel())), shape=(n, n))
    a = a.maximum(a.T)
    lap = laplacian(a, normed=True)
    m = ks[-1] + 1
    if n <= 2000:
        evals = np.linalg.eigvalsh(lap.toarray())[:m]
    else:
        from scipy.sparse.linalg import eigsh

        # Smallest eigenvalues of L = largest of 2I - L (L's spectrum lies in [0, 2]).
        shifted = sp.identity(n, format="csr") * 2.0 - lap
        evals = np.sort(2.0 - eigsh(shifted, k=m, which="LA", return_eigenvectors=False))
    return {k: float(evals[k] - evals[k - 1]) for k in ks}


# A head trains its clusters to agree with the K nearest neighbours; where a point's neighbours
# mostly fall in other K-Means clusters, the graph carries no cluster structure for it to use.
# Calibrated on the bench sets of docs/heads.md (bench/bench_heads.py prints this estimate
# beside the labelled kNN@20 consistency).
ADVICE_NEIGHBOURS = 20
ADVICE_THRESHOLD = 0.80


@dataclass
class NeighbourAdvice:
    """What :func:`head_advice` measured, with the graph it built (reusable by ``fit_head``)."""

    estimate: float  # mean fraction of the K nearest neighbours in the point's own K-Means cluster
    threshold: float
    n_neighbors: int
    warning: str | None
    neighbors: tuple[np.ndarray, np.ndarray] = field(repr=False)

    def as_dict(self) -> dict:
        return {"kmeans_neighbour_agreement": round(self.estimate, 4), "n_neighbors": self.n_neighbors,
                "threshold": self.threshold, "warning": self.warning}


def kmeans_neighbour_agreement(embeddings, k: int, *, n_neighbors: int = ADVICE_NEIGHBOURS, seed: int = 0,
                               neighbors=None, n_init: int = 3) -> float:
    """A label-free stand-in for kNN@``n_neighbors`` label consistency: K-Means (k clusters, on the
    L2-normalised embeddings) labels take the place of the true labels."""
    from sklearn.cluster import KMeans

    x = l2_normalize(embeddings).astype(np.float32)
    idx = nearest_neighbors(x, n_neighbors)[1] if neighbors is None else np.asarray(neighbors[1])[:, :n_neighbors]
    pseudo = KMeans(k, n_init=n_init, random_state=seed).fit_predict(x)
    return float((pseudo[idx] == pseudo[:, None]).mean())


def head_advice(embeddings, k: int, method: str, *, seed: int = 0, graph_neighbors: int = 0,
                n_neighbors: int = ADVICE_NEIGHBOURS, threshold: float = ADVICE_THRESHOLD) -> NeighbourAdvice:
    """Whether a ``method`` (tsp or temi) head is likely to help on these embeddings, without labels.

    Builds one neighbour graph with max(``n_neighbors``, ``graph_neighbors``) columns (pass the
    head's n_neighbors so that ``fit_head(..., neighbors=advice.neighbors)`` reuses it) and
    measures :func:`kmeans_neighbour_agreement`. Below ``threshold`` the returned ``warning`` says
    that the head may not beat K-Means; otherwise it is None.
    """
    x = l2_normalize(embeddings).astype(np.float32)
    cols = min(max(n_neighbors, graph_neighbors), len(x) - 1)
    if cols < 1:
        raise InputError(f"need at least 2 embeddings for a neighbour graph, got {len(x)}")
    graph = nearest_neighbors(x, cols)
    kk = min(n_neighbors, cols)
    est = kmeans_neighbour_agreement(x, k, n_neighbors=kk, seed=seed, neighbors=graph)
    warning = None
    if est < threshold:
        warning = (f"--method {method}: only {100 * est:.0f}% of each embedding's {kk} nearest neighbours share "
                   f"its K-Means cluster (below {100 * threshold:.0f}%); the neighbours carry little cluster "
                   f"structure, so a {method.upper()} head may not beat K-Means here: compare with --method kmeans "
                   f"(see docs/heads.md)")
    return NeighbourAdvice(estimate=est, threshold=threshold, n_neighbors=kk, warning=warning, neighbors=graph)
