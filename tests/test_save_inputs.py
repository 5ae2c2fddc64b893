"""itae-cluster --save-inputs: the model's inputs and masks beside the embeddings, rows as in embeddings.npy."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from itae_export.cli.cluster import main as cluster_cli
from PIL import Image

from itae_export.cluster.tensors import write_inputs_and_masks
from itae_export.errors import InputError
from itae_export.images import load_image
from itae_export.onnx.manifest import read_manifest
from itae_export.runtime import run_onnx


def _folder(root):
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    for i in range(6):
        src = china if i % 2 else flower
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(src[i * 40 : i * 40 + 90 + i * 7, i * 50 : i * 50 + 120]).save(d / f"{i}.png")
    (root / "b" / "broken.jpg").write_bytes(b"not a jpeg")


def test_save_inputs_writes_tensors_and_masks_in_row_order(tiny_model, tmp_path):
    root, out = tmp_path / "photos", tmp_path / "out"
    _folder(root)
    res = CliRunner().invoke(cluster_cli, [str(root), "--k", "2", "--onnx", str(tiny_model), "--out", str(out),
                                           "--save-inputs", "--quiet", "--workers", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    with open(out / "assignments.csv", newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    assert len(paths) == 6  # the broken file is skipped, not a row
    px = np.load(out / "pixel_values.npy")
    masks = np.load(out / "artifact_mask.npy")
    manifest = read_manifest(tiny_model)
    assert px.dtype == np.float32 and px.shape == (6, 3, 56, 56)
    assert masks.dtype == np.bool_ and masks.shape == (6, manifest["num_tokens"] - 1)
    for row, p in zip(px, paths):
        np.testing.assert_array_equal(row, load_image(root / p, manifest["preprocessing"]))
    ref = run_onnx(tiny_model, px)
    np.testing.assert_array_equal(masks, ref["artifact_mask"])
    emb = np.load(out / "embeddings.npy")
    assert np.abs(emb - ref["embedding"]).max() <= 1e-5 * np.abs(emb).max()
    info = json.loads((out / "inputs.json").read_text())
    assert info["rows"] == 6 and info["embeddings_check"]["rel_max_abs_diff"] <= 1e-5
    assert not list(out.glob(".*.tmp"))


def test_save_inputs_needs_a_finished_run(tmp_path):
    with pytest.raises(InputError, match="not an itae-cluster output folder"):
        write_inputs_and_masks(tmp_path)
