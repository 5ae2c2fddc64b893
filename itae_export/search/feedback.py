"""Relevance feedback: re-rank a collection from the images a user marked relevant or irrelevant.

Three methods, all on the unit vectors of a :class:`~itae_export.search.index.SearchIndex`
(``q`` the query, ``P`` the relevant vectors, ``N`` the irrelevant ones, ``x`` a candidate):

- ``knn`` (Nara et al., ECCV 2024 Workshops, training-free): a nearest-neighbour classifier over
  the feedback. ``score(x) = mean of the k largest x.p over p in {q} + P  -  mean of the k largest
  x.n over n in N`` (the second term is 0 while N is empty); k = 1 by default (the paper's 1-NN).
- ``rocchio``: ``q' = alpha q + beta mean(P) - gamma mean(N)``, renormalised, then ranked by
  ``x.q'`` (alpha 1, beta 0.75, gamma 0.15: the classic values).
- ``logreg``: a logistic regression fitted on {q} + P (label 1) against N (label 0), balanced
  class weights; ``score(x) = w.x + b``. With no irrelevant image yet it ranks like ``rocchio``.
- ``none``: the query alone (the baseline).

Images already judged are never returned. On an approximate index, ``knn`` re-scores exactly the
union of the index's top ``pool`` neighbours of q and of each relevant image; the linear methods
search the index with their query vector (``w`` for logreg: ranking by w.x + b is ranking by w.x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from itae_export.errors import InputError
from itae_export.search.index import SearchIndex

METHODS = ("knn", "rocchio", "logreg", "none")


@dataclass(frozen=True)
class FeedbackParams:
    knn_k: int = 1
    alpha: float = 1.0
    beta: float = 0.75
    gamma: float = 0.15
    logreg_c: float = 1.0
    pool: int = 2000  # candidates per positive on an approximate index


def _topk_mean(s: np.ndarray, k: int) -> np.ndarray:
    """Mean of the k largest values of each row of s [n, m]."""
    k = min(k, s.shape[1])
    if k == s.shape[1]:
        return s.mean(axis=1) if k > 1 else s[:, 0]
    return np.partition(s, s.shape[1] - k, axis=1)[:, -k:].mean(axis=1)


def knn_scores(x: np.ndarray, positives: np.ndarray, negatives: np.ndarray, k: int = 1) -> np.ndarray:
    """The training-free nearest-neighbour rule (module docstring) for the rows of x."""
    s = _topk_mean(x @ positives.T, k)
    if len(negatives):
        s = s - _topk_mean(x @ negatives.T, k)
    return s


def rocchio_query(q: np.ndarray, positives: np.ndarray, negatives: np.ndarray, p: FeedbackParams) -> np.ndarray:
    v = p.alpha * q
    if len(positives):
        v = v + p.beta * positives.mean(axis=0)
    if len(negatives):
        v = v - p.gamma * negatives.mean(axis=0)
    norm = np.linalg.norm(v)
    return (v / norm if norm > 0 else q).astype(np.float32)


def logreg_weights(q: np.ndarray, positives: np.ndarray, negatives: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([q[None], positives, negatives]).astype(np.float64)
    y = np.r_[np.ones(1 + len(positives)), np.zeros(len(negatives))]
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=1000).fit(x, y)
    return clf.coef_[0].astype(np.float32), float(clf.intercept_[0])


def rank(index: SearchIndex, query: np.ndarray, judgments: dict[int, bool], k: int, method: str = "knn",
         params: FeedbackParams | None = None, exclude: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(row ids [<= k], scores) of the best unjudged images after feedback, best first.

    ``query``: the query's unit vector [D]; ``judgments``: {row id: True relevant / False irrelevant};
    ``exclude``: more rows never returned (the query image itself, for a query by an image of the collection)."""
    if method not in METHODS:
        raise InputError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    if k < 1:
        raise InputError(f"-k: {k} must be >= 1")
    p = params or FeedbackParams()
    q = np.asarray(query, np.float32).reshape(-1)
    if q.shape[0] != index.dim:
        raise InputError(f"query dimension {q.shape[0]} differs from the index's {index.dim}")
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    pos_ids = sorted(i for i, rel in judgments.items() if rel)
    neg_ids = sorted(i for i, rel in judgments.items() if not rel)
    positives, negatives = index.vectors[pos_ids], index.vectors[neg_ids]
    exclude = set(judgments) | set(exclude or ())

    if method == "none" or (method != "knn" and not pos_ids and not neg_ids):
        ids, scores = index.search(q, k, exclude=exclude)
    elif method == "rocchio" or (method == "logreg" and not neg_ids):
        ids, scores = index.search(rocchio_query(q, positives, negatives, p), k, exclude=exclude)
    elif method == "logreg":
        w, b = logreg_weights(q, positives, negatives, p.logreg_c)
        if index.kind == "exact":
            ids, scores = _top_of(index.vectors @ w + b, k, exclude)
            return ids, scores
        ids, scores = index.search(w / max(float(np.linalg.norm(w)), 1e-12), k, exclude=exclude)
        scores = np.where(ids >= 0, index.vectors[np.maximum(ids, 0)] @ w + b, -np.inf)
    else:  # knn
        anchors = np.concatenate([q[None], positives])
        if index.kind == "exact":
            return _top_of(knn_scores(index.vectors, anchors, negatives, p.knn_k), k, exclude)
        cand, _ = index.search(anchors, p.pool, exclude=exclude)
        cand = np.unique(cand[cand >= 0])
        s = knn_scores(index.vectors[cand], anchors, negatives, p.knn_k)
        order = np.argsort(-s, kind="stable")[:k]
        return cand[order], s[order]
    ids, scores = ids[0], scores[0]
    keep = ids >= 0
    return ids[keep], scores[keep]


def _top_of(scores: np.ndarray, k: int, exclude: set[int]) -> tuple[np.ndarray, np.ndarray]:
    s = scores.astype(np.float32).copy()
    if exclude:
        s[list(exclude)] = -np.inf
    k = min(k, len(s) - len(exclude))
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    part = np.argpartition(-s, k - 1)[:k]
    order = part[np.argsort(-s[part], kind="stable")]
    return order.astype(np.int64), s[order]
