"""itae_export.cluster.metrics against cases computed by hand."""

import math

import numpy as np
import pytest

from itae_export.cluster.metrics import (
    cluster_accuracy,
    clustering_scores,
    contingency,
    l2_normalize,
    many_to_one_accuracy,
    paper_protocol,
)


def test_acc_is_invariant_to_cluster_renaming():
    y = [0, 0, 1, 1, 2, 2]
    assert cluster_accuracy(y, [2, 2, 0, 0, 1, 1]) == 1.0
    assert cluster_accuracy(["cat", "cat", "dog", "dog"], [7, 7, 3, 3]) == 1.0


def test_acc_one_error():
    # clusters {0,1,2 | 3,4,5} with one 'b' placed in the first cluster: 5 of 6 matched
    assert cluster_accuracy(list("aaabbb"), [0, 0, 0, 0, 1, 1]) == pytest.approx(5 / 6)


def test_acc_more_clusters_than_classes():
    # clusters x classes: c0 [2, 0], c1 [1, 1], c2 [0, 2]; one-to-one: c0->0, c2->1, c1 unmatched
    y, p = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    assert contingency(y, p).tolist() == [[2, 0], [1, 1], [0, 2]]
    assert cluster_accuracy(y, p) == pytest.approx(4 / 6)
    # many-to-one: c0->0 (2), c1->either (1), c2->1 (2)
    assert many_to_one_accuracy(y, p) == pytest.approx(5 / 6)


def test_acc_fewer_clusters_than_classes():
    # c0 [2, 2, 0], c1 [0, 0, 2]: one class of c0 stays unmatched
    y, p = [0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1]
    assert cluster_accuracy(y, p) == pytest.approx(4 / 6)
    assert many_to_one_accuracy(y, p) == pytest.approx(4 / 6)


def test_acc_hungarian_beats_greedy():
    # contingency: c0 [A 5, B 4], c1 [A 4, B 1]. Greedy takes the largest cell (c0->A) and is
    # left with c1->B: 6/14. The best one-to-one matching is c0->B + c1->A: 8/14.
    y = ["A"] * 5 + ["B"] * 4 + ["A"] * 4 + ["B"] * 1
    p = [0] * 9 + [1] * 5
    assert cluster_accuracy(y, p) == pytest.approx(8 / 14)


def test_nmi_and_ari_by_hand():
    # pred refines true: MI = H(true) = ln 2, H(pred) = 1.5 ln 2; NMI (arithmetic) = 1 / 1.25
    s = clustering_scores([0, 0, 1, 1], [0, 0, 1, 2])
    assert s["nmi"] == pytest.approx(0.8)
    assert s["acc"] == pytest.approx(3 / 4)
    # contingency c0 [2, 1], c1 [0, 1]: index 1, expected 3 * 2 / 6 = 1, max 2.5 -> ARI 0
    s = clustering_scores([0, 0, 1, 1], [0, 0, 0, 1])
    assert s["ari"] == pytest.approx(0.0, abs=1e-12)
    s = clustering_scores([0, 0, 1, 1], [1, 1, 0, 0])
    assert s == {"acc": 1.0, "nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}


def test_l2_normalize():
    x = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert x[0].tolist() == [0.6, 0.8]
    assert np.all(np.isfinite(x[1]))


def test_paper_protocol_equals_manual_runs():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8))
    x = np.concatenate([c + 0.9 * rng.normal(size=(20, 8)) for c in centers])  # overlapping: runs differ
    y = np.repeat([0, 1, 2], 20)
    calls = []
    out = paper_protocol(x, y, 3, sets=3, runs=2, seed=5, progress=calls.append)
    assert len(calls) == 6
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    set_means = []
    for s in range(3):
        aris = [adjusted_rand_score(y, KMeans(3, n_init=1, random_state=5 + s * 2 + r).fit_predict(xn)) for r in range(2)]
        set_means.append(np.mean(aris))
    assert out["ari"]["mean"] == pytest.approx(np.mean(set_means))
    assert out["ari"]["se"] == pytest.approx(np.std(set_means, ddof=1) / math.sqrt(3))
    assert out["protocol"] == {"sets": 3, "runs": 2, "seed": 5}
