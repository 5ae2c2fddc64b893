"""k-NN accuracy, neighbour label consistency, over-clustering scores, choose_k."""

import math

import numpy as np
import pytest

from itae_export.cluster.evaluation import (
    choose_k,
    knn_accuracy,
    knn_predict,
    neighbour_label_consistency,
    over_clustering_scores,
)
from itae_export.errors import InputError


def unit(deg):
    r = np.deg2rad(np.asarray(deg, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


def test_weighted_vote_differs_from_majority_by_hand():
    # Query at 0 deg. Class 1 has one very close neighbour (5 deg); class 0 two far ones (60, 70 deg).
    train = unit([5, 60, 70])
    labels = np.array([1, 0, 0])
    query = unit([0])
    # Weighted (T=0.07): exp(cos5/T) = exp(14.2) >> exp(cos60/T) + exp(cos70/T) = exp(7.1) + exp(4.9).
    w1 = math.exp(math.cos(math.radians(5)) / 0.07)
    w0 = math.exp(math.cos(math.radians(60)) / 0.07) + math.exp(math.cos(math.radians(70)) / 0.07)
    assert w1 > w0
    assert knn_predict(train, labels, query, k=3).tolist() == [1]
    assert knn_predict(train, labels, query, k=3, weighted=False).tolist() == [0]
    # With a very high temperature the weights flatten and the majority wins again.
    assert knn_predict(train, labels, query, k=3, temperature=100.0).tolist() == [0]


def test_knn_accuracy_uses_cosine_and_string_labels():
    train = unit([0, 10, 90, 100]) * np.array([[1], [50], [1], [0.01]])  # norms must not matter
    labels = np.array(["a", "a", "b", "b"])
    test = unit([5, 95, 80])
    assert knn_accuracy(train, labels, test, np.array(["a", "b", "b"]), k=1) == 1.0
    assert knn_accuracy(train, labels, test, np.array(["a", "b", "a"]), k=1) == pytest.approx(2 / 3)


def test_knn_input_errors():
    with pytest.raises(InputError, match="labels"):
        knn_accuracy(unit([0, 1]), [0], unit([0]), [0])
    with pytest.raises(InputError, match="k must be"):
        knn_accuracy(unit([0, 1]), [0, 1], unit([0]), [0], k=5)


def test_neighbour_label_consistency_by_hand():
    # Two tight pairs 80 deg apart: the 1st neighbour always shares the label, the 2nd and 3rd never.
    x = unit([0, 10, 90, 100])
    y = [0, 0, 1, 1]
    c = neighbour_label_consistency(x, y, ks=(1, 2, 3))
    assert c == {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3)}


def test_over_clustering_scores_on_hand_made_labels():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    split = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # each class split in two clusters
    s = over_clustering_scores(y, split)
    assert s["many_to_one_acc"] == 1.0 and s["n_clusters"] == 4 and s["n_classes"] == 2
    assert 0 < s["ami"] < 1
    one_wrong = np.array([0, 0, 1, 1, 2, 2, 3, 0])
    assert over_clustering_scores(y, one_wrong)["many_to_one_acc"] == pytest.approx(7 / 8)
    assert over_clustering_scores(y, y)["ami"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noise = over_clustering_scores(rng.integers(0, 10, 5000), rng.integers(0, 30, 5000))
    assert abs(noise["ami"]) < 0.01  # adjusted for chance, unlike NMI
    assert noise["nmi"] > noise["ami"]


def _blobs(k=4, n_per=80, dim=10, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:k]
    return np.concatenate([c + 0.08 * rng.normal(size=(n_per, dim)) for c in centres])


@pytest.mark.parametrize("criterion", ["silhouette", "eigengap"])
@pytest.mark.parametrize("k", [3, 5])
def test_choose_k_recovers_blobs(criterion, k):
    best, curve = choose_k(_blobs(k=k), range(2, 9), criterion=criterion, seed=0)
    assert best == k
    assert sorted(curve) == list(range(2, 9))


def test_choose_k_eigengap_sparse_path_on_subsample():
    # Above 2000 points the sparse eigensolver is used; max_points keeps the subset.
    x = _blobs(k=4, n_per=600)
    best, _ = choose_k(x, range(2, 8), criterion="eigengap", seed=1, max_points=2100)
    assert best == 4


def test_choose_k_errors():
    with pytest.raises(InputError, match="criterion"):
        choose_k(_blobs(), range(2, 5), criterion="elbow")
    with pytest.raises(InputError, match=">= 2"):
        choose_k(_blobs(), range(1, 5))
