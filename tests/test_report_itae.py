"""The report's ITAE part: the run's own norm histogram with its theta, the most-flagged images'
attention maps (from the weights the graph names), the artifact counts and the baseline table."""

from __future__ import annotations

import imagefolders as datasets
import numpy as np
import pytest
import torch
from tiny import random_model, theta_for_varied_artifacts, tiny_spec

from itae_export.calibrate.inspection import compute_norms, inspect_run, load_inspect_model
from itae_export.cluster.artifacts import artifact_stats
from itae_export.cluster.job import run_cluster_job
from itae_export.cluster.report import FLAGGED_NAME, NORMS_NAME, REPORT_NAME, _itae_html, write_report
from itae_export.onnx.export import export_onnx
from itae_export.registry import ITAEOptions

RES = 56


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("report_itae")
    spec = tiny_spec("dinov2_vits14")
    model = random_model(spec, seed=3)
    weights = base / "tiny.pth"
    torch.save(model.state_dict(), weights)
    theta = theta_for_varied_artifacts(model, spec, quantile=0.7)
    r = export_onnx(spec, ITAEOptions(theta=theta), base / "m.onnx", weights=str(weights), resolution=RES,
                    validate=False)
    root = base / "photos"
    datasets.fashion_folder(root, per_class=4, classes=3)
    summary = run_cluster_job(root, r.path, 3, base / "out", progress=False, workers=1)
    return base, weights, r, summary


def test_report_shows_the_runs_histogram_and_flagged_maps(run):
    base, _, r, summary = run
    out = base / "out"
    page = write_report(out, pictures=inspect_run, norm_images=12).read_text()
    assert (out / NORMS_NAME).stat().st_size > 1000 and (out / FLAGGED_NAME).stat().st_size > 1000
    assert 'id="norms"' in page and 'id="flagged"' in page and "What ITAE did" in page


def test_the_histogram_is_of_the_runs_images_at_its_theta(run):
    """inspect_run's counts are the Eq. 3-4 masks of the norms of the run's own images."""
    base, weights, r, summary = run
    root = base / "photos"
    rel = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    rec = inspect_run(r.manifest, r.path, root, rel, base, max_images=len(rel), hist_name="h.png",
                      attention_name="a.png")
    assert rec["images"] == len(rel)
    spec = tiny_spec("dinov2_vits14")
    import dataclasses

    spec = dataclasses.replace(spec, preprocessing=dataclasses.replace(spec.preprocessing, resolution=RES))
    im = load_inspect_model(spec, random_weights=True, seed=3, theta=r.manifest["itae"]["theta"])
    im.model.fix_resolution(RES)
    sample = compute_norms(im, root, [root / p for p in rel])
    from itae_export.calibrate.inspection import artifact_mask_np

    mask = artifact_mask_np(sample.norms, r.manifest["itae"]["theta"])
    want = artifact_stats(mask.sum(1), mask.shape[1], theta=r.manifest["itae"]["theta"])
    assert rec["artifacts"]["tokens_flagged"] == want["tokens_flagged"] > 0
    assert len(rec["attention_images"]) == min(4, int((mask.sum(1) > 0).sum()))


def test_report_without_the_weights_says_so(run, tmp_path):
    base, weights, r, summary = run
    moved = weights.with_suffix(".away")
    weights.rename(moved)
    try:
        page = write_report(base / "out", pictures=inspect_run, norm_images=12).read_text()
    finally:
        moved.rename(weights)
    assert "No norm histogram:" in page and "not on this machine" in page


def test_baseline_table_and_artifact_warning_in_the_page(tmp_path):
    summary = {
        "artifacts": artifact_stats(np.full(5, 60), 256, theta=2.5),
        "baseline": {"metrics": {"itae": {"acc": 0.5, "nmi": 0.4, "ari": 0.3},
                                 "baseline": {"acc": 0.6, "nmi": 0.5, "ari": 0.4},
                                 "delta": {"acc": -0.1, "nmi": -0.1, "ari": -0.1}},
                     "n_changed": 2, "changed": [{"path": "a/x.png"}, {"path": "b/y.png"}]},
    }
    html = "\n".join(_itae_html(summary, tmp_path, tmp_path, [], None, 0))
    assert 'id="baseline"' in html and "<td>0.6000</td>" in html and "<td>-0.1000</td>" in html
    assert 'class="warn"' in html and "--no-itae" in html and "a/x.png" in html


def test_the_histogram_of_a_tar_run(run, tmp_path):
    """A run of WebDataset tars: summary.json's folder is the tar, the keys <tar>/<sample>; the
    histogram decodes the members through the source layer, with the norms of the same files."""
    import tarfile

    base, weights, r, summary = run
    root = base / "photos"
    rel = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    tar = tmp_path / "photos.tar"
    with tarfile.open(tar, "w") as tf:
        for p in rel:
            tf.add(root / p, arcname=p)
    keys = [f"photos.tar/{p[:-4]}" for p in rel]
    kw = dict(max_images=len(rel), hist_name="h.png", attention_name="a.png")
    from_tar = inspect_run(r.manifest, r.path, tar, keys, tmp_path, **kw)
    from_folder = inspect_run(r.manifest, r.path, root, rel, base, **kw)
    assert from_tar["images"] == len(rel)
    assert from_tar["artifacts"] == from_folder["artifacts"]
    assert [p.removeprefix("photos.tar/") for p in from_tar["attention_images"]] == \
        [p[:-4] for p in from_folder["attention_images"]]
