"""itae-cluster beyond K-Means: --k auto, TSP/TEMI heads exported and appended to the encoder,
over-clustering and k-NN scores, on real Fashion-MNIST images with a tiny exported model."""

import json

import imagefolders
import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from itae_export.cli.cluster import main as cluster_cli

from itae_export.images import load_image
from itae_export.onnx.manifest import read_manifest


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    model = tiny_model
    base = tmp_path_factory.mktemp("fm")
    imagefolders.fashion_folder(base / "query", per_class=12, classes=4)
    imagefolders.fashion_folder(base / "reference", per_class=10, classes=4, seed=1)
    return model, base


def _run(args):
    res = CliRunner().invoke(cluster_cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def test_tsp_head_exported_and_appended_gives_same_clusters(setup, tmp_path):
    model, base = setup
    head = tmp_path / "head.onnx"
    _run([base / "query", "--onnx", model, "--k", 4, "--method", "tsp", "--epochs", 5, "--head-out", head,
          "--labels-from-dirs", "--out", tmp_path / "out", "-q"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["method"] == "tsp" and summary["head"]["hparams"]["epochs"] == 5
    assert summary["clustering"]["method"] == "tsp" and summary["clustering"]["name"] == "TSP head"
    assert "kmeans" not in summary  # a head run is not called K-Means
    assert summary["head"]["check"]["assignments_equal"] and summary["head"]["check"]["max_abs_err"] <= 1e-5
    composed = tmp_path / "head.with_encoder.onnx"
    assert head.is_file() and composed.is_file()
    # the appended graph assigns real images exactly as the PyTorch head did in the job
    rows = (tmp_path / "out" / "assignments.csv").read_text().splitlines()[1:]
    paths = [r.split(",")[0] for r in rows]
    clusters = [int(r.split(",")[1]) for r in rows]
    pre = read_manifest(model)["preprocessing"]
    x = np.stack([load_image(base / "query" / p, pre) for p in paths])
    sess = ort.InferenceSession(str(composed), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert {"embedding", "artifact_mask", "cluster_probs", "cluster"} <= set(names)
    got = dict(zip(names, sess.run(None, {"pixel_values": x})))
    np.testing.assert_array_equal(got["cluster"], clusters)
    np.testing.assert_allclose(got["cluster_probs"].sum(1), 1, atol=1e-5)


def test_k_auto_over_clustering_neighbours_and_knn(setup, tmp_path):
    model, base = setup
    res = _run([base / "query", "--onnx", model, "--k", "auto", "--k-max", 8, "--labels-from-dirs",
                "--knn-reference", base / "reference", "--out", tmp_path / "out", "-q"])
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    curve = {int(k): v for k, v in s["k_auto"]["curve"].items()}
    assert sorted(curve) == list(range(2, 9)) and s["clustering"]["k"] == max(curve, key=lambda k: (curve[k], -k))
    assert len(s["cluster_sizes"]) == s["clustering"]["k"]
    assert set(s["neighbour_label_consistency"]) == {"1", "5", "10", "20"}
    assert s["knn"]["n_reference"] == 40 and 0 <= s["knn"]["accuracy"] <= 1
    if s["clustering"]["k"] > 4:
        assert "over_clustering" in s["metrics"]
    assert "chosen by silhouette" in res.output


def test_over_clustering_scores_when_k_exceeds_classes(setup, tmp_path):
    model, base = setup
    _run([base / "query", "--onnx", model, "--k", 8, "--labels-from-dirs", "--out", tmp_path / "out", "-q"])
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    o = s["metrics"]["over_clustering"]
    assert o["many_to_one_acc"] >= s["metrics"]["acc"]  # many-to-one can only gain from extra clusters
    assert -1 <= o["ami"] <= 1


@pytest.mark.parametrize("args,msg", [
    (["--k", "x"], "--k"),
    (["--k", 4, "--head-out", "h.onnx"], "--head-out"),
    (["--k", 4, "--knn-reference", "."], "--labels-from-dirs"),
])
def test_bad_method_flags(setup, tmp_path, args, msg):
    model, base = setup
    res = CliRunner().invoke(cluster_cli, [str(a) for a in [base / "query", "--onnx", model, *args,
                                                            "--out", tmp_path / "o", "-q"]])
    assert res.exit_code != 0 and msg in res.output


def test_summary_names_the_kmeans_backend_that_ran(setup, tmp_path, monkeypatch):
    """summary.json says which K-Means clustered the folder: scikit-learn with its n_init below
    FAISS_MIN_POINTS, faiss with its sample and iterations from there on (threshold lowered here)."""
    pytest.importorskip("faiss")
    from itae_export.cluster import faiss_kmeans as fk

    model, base = setup
    _run([base / "query", "--onnx", model, "--k", 4, "--n-init", 3, "--out", tmp_path / "small", "-q"])
    small = json.loads((tmp_path / "small" / "summary.json").read_text())["clustering"]
    assert small["backend"] == "sklearn" and small["n_init"] == 3
    monkeypatch.setattr(fk, "FAISS_MIN_POINTS", 20)
    res = _run([base / "query", "--onnx", model, "--k", 4, "--n-init", 3, "--out", tmp_path / "large"])
    big = json.loads((tmp_path / "large" / "summary.json").read_text())["clustering"]
    assert big["backend"] == "faiss" and "n_init" not in big
    assert big["sample_size"] == 48 and big["niter"] == fk.DEFAULT_NITER and big["spherical"] is True
    assert "faiss" in res.output and "--n-init does not apply" in res.output
    sizes = json.loads((tmp_path / "large" / "summary.json").read_text())["cluster_sizes"]
    assert sum(sizes) == 48
