"""The effect side by side: the graph's optional embedding_unpatched output, and the comparison of
itae-cluster --compare-baseline (cluster/baseline.py)."""

from __future__ import annotations

import copy

import imagefolders as datasets
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import random_model, remove_itae, theta_for_varied_artifacts, tiny_spec

from itae_export.cli.cluster import main as cluster_cli
from itae_export.cluster.baseline import compare_with_baseline, match_clusters
from itae_export.cluster.job import kmeans_assign, labels_from_dirs
from itae_export.images import load_image
from itae_export.onnx.contract import OUTPUT_EMBEDDING_UNPATCHED
from itae_export.onnx.export import export_onnx
from itae_export.registry import ITAEOptions
from itae_export.runtime import run_onnx

RES = 56


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(export result with embedding_unpatched, the plain model with the same weights)."""
    spec = tiny_spec("dinov2_vits14")
    model = random_model(spec, seed=3)
    plain = copy.deepcopy(model)
    theta = theta_for_varied_artifacts(model, spec, quantile=0.7)
    out = tmp_path_factory.mktemp("unpatched") / "m.onnx"
    r = export_onnx(spec, ITAEOptions(theta=theta), out, model=model, resolution=RES, unpatched_output=True)
    plain.fix_resolution(RES)
    return r, remove_itae(plain.eval())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos") / "photos"
    datasets.fashion_folder(root, per_class=6, classes=3)
    return root, sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def test_unpatched_output_is_the_plain_model(pair, photos):
    r, plain = pair
    root, paths = photos
    assert r.manifest["outputs"][-1]["name"] == OUTPUT_EMBEDDING_UNPATCHED
    assert r.manifest["validation"]["unpatched"]["rel_max_abs_diff"] <= 1e-4
    x = np.stack([load_image(root / p, r.manifest["preprocessing"]) for p in paths])
    got = run_onnx(r.path, x)
    with torch.no_grad():
        want = plain(torch.from_numpy(x)).numpy()
    scale = np.abs(want).max()
    assert np.abs(got[OUTPUT_EMBEDDING_UNPATCHED] - want).max() / scale < 1e-5
    assert got["artifact_mask"].any(1).sum() >= len(paths) // 2, "setup: ITAE edits most of these images"
    assert np.abs(got["embedding"] - want).max() / scale > 1e-3, "the patched embedding differs"


def test_match_clusters_renames_by_overlap():
    ref = np.array([0, 0, 1, 1, 2, 2])
    other = np.array([2, 2, 0, 0, 1, 0])  # the same partition up to names, one image moved
    m = match_clusters(ref, other)
    assert m.tolist() == [0, 0, 1, 1, 2, 1]


def test_comparison_on_the_graph_outputs(pair, photos):
    r, _ = pair
    root, paths = photos
    x = np.stack([load_image(root / p, r.manifest["preprocessing"]) for p in paths])
    got = run_onnx(r.path, x)
    y = labels_from_dirs(paths)
    patched_labels = kmeans_assign(got["embedding"], 3, seed=0)[0]
    rec = compare_with_baseline(paths, got["embedding"], got[OUTPUT_EMBEDDING_UNPATCHED], patched_labels, 3,
                                kmeans_assign, y=y, seed=0)
    base = match_clusters(patched_labels, kmeans_assign(got[OUTPUT_EMBEDDING_UNPATCHED], 3, seed=0)[0])
    assert rec["n_changed"] == int((base != patched_labels).sum())
    assert [c["path"] for c in rec["changed"]] == [paths[i] for i in np.flatnonzero(base != patched_labels)]
    from itae_export.cluster.metrics import clustering_scores

    assert rec["metrics"]["baseline"] == clustering_scores(y, base)
    assert rec["metrics"]["itae"] == clustering_scores(y, patched_labels)
    assert rec["cosine_itae_vs_baseline"]["min"] < 1.0


def test_compare_baseline_needs_the_output(tiny_model, photos, tmp_path):
    root, _ = photos
    res = CliRunner().invoke(cluster_cli, [str(root), "--k", "3", "--onnx", str(tiny_model), "--compare-baseline",
                                           "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "--compare-baseline" in errors[0] and "--unpatched-output" in errors[0]
    assert not (tmp_path / "o" / "summary.json").exists()


def test_compare_baseline_end_to_end(pair, photos, tmp_path):
    from itae_export.data.embed import EmbedResult

    if "extra" not in EmbedResult.__dataclass_fields__:
        pytest.skip("the embed stage does not return extra graph outputs yet (EmbedResult.extra)")
    r, _ = pair
    root, _ = photos
    res = CliRunner().invoke(cluster_cli, [str(root), "--k", "3", "--onnx", str(r.path), "--compare-baseline",
                                           "--labels-from-dirs", "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "ITAE vs baseline (unpatched): ACC" in res.output and "images changed cluster" in res.output
