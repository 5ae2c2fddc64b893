"""itae-inspect on real images (textile JPEGs) with tiny random-weight models."""

from __future__ import annotations

import dataclasses
import json

import imagefolders as datasets
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from itae_export.cli.inspect import main as inspect_cli
from PIL import Image
from tiny import tiny_spec


@pytest.fixture(scope="module")
def textiles(tmp_path_factory):
    if datasets.textile_root() is None:
        pytest.skip("conformal-clip-data (textile JPEGs) is not installed")
    root = tmp_path_factory.mktemp("inspect") / "textiles"
    datasets.textile_folder(root, per_class=3)
    return root


def small_spec(name="dinov2_vits14", resolution=56, depth=2):
    """Tiny width and depth, and a small input: 4x4 patches."""
    spec = tiny_spec(name, depth=depth)
    return dataclasses.replace(spec, preprocessing=dataclasses.replace(spec.preprocessing, resolution=resolution))


def _check_png(path, size):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size, (im.format, im.size)


def test_cli_writes_histogram_and_json(textiles, tmp_path, monkeypatch):
    from itae_export.plots import HIST_SIZE

    # the CLI resolves registry names; swap in the tiny architecture of the same family
    monkeypatch.setattr("itae_export.calibrate.inspection.get_model_spec", lambda name: small_spec(name, 112))
    out = tmp_path / "out"
    res = CliRunner().invoke(inspect_cli, [str(textiles), "--model", "vits14_reg", "--random-weights",
                                           "--max-images", "6", "--theta", "1.7", "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout[res.stdout.index("{"):])
    written = json.loads((out / "inspect.json").read_text())
    assert {k: v for k, v in printed.items() if k != "out_dir"} == written
    assert written["images"] == 6 and written["random_weights"] is True
    assert written["num_register_tokens"] == 4 and written["tokens_per_image"] == 4 + 8 * 8
    assert written["current_theta"] == 1.7
    n = 6 * written["tokens_per_image"]
    for side in ("current", "suggested"):
        assert sum(written["counts"][side].values()) == n
    # per-image artifacts at theta 1.7: the minority side, never more than half the tokens
    assert written["per_image_artifacts"]["current"]["max"] <= written["tokens_per_image"] // 2
    assert isinstance(written["bimodal"], bool) and 0 <= written["confidence"] <= 1
    if not written["bimodal"]:
        assert "warning: no bimodality" in res.stderr
    _check_png(out / "norms_hist.png", HIST_SIZE)


def test_norms_are_the_last_block_projection_norms(textiles):
    """Independent: hook the last block's qkv, split q, k, v, norm over heads / sqrt(d)."""
    from itae_export.calibrate.inspection import compute_norms, load_inspect_model, pick_images

    spec = small_spec("dinov2_vits14_reg", 112)
    root, paths = pick_images(textiles, 4)
    for i, source in enumerate(("query", "key", "value")):
        im = load_inspect_model(spec, random_weights=True, source=source)
        seen = []
        im.model.blocks[-1].attn.qkv.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
        sample = compute_norms(im, root, paths, batch_size=3)
        qkv = torch.cat(seen)
        C = spec.arch.embed_dim
        d = C // spec.arch.num_heads
        p = qkv[..., i * C:(i + 1) * C][:, 1:]
        expect = (p.float().pow(2).sum(-1).sqrt() / d**0.5).numpy()
        assert sample.norms.shape == expect.shape == (4, 4 + 64)
        np.testing.assert_allclose(sample.norms, expect, rtol=1e-5, atol=1e-6)


def test_attention_maps_from_exported_models_match_pytorch(textiles, tmp_path):
    from itae_export.calibrate.inspection import attention_maps, compute_norms, load_inspect_model, pick_images
    from itae_export.plots import ATT_PANEL, plot_attention

    spec = small_spec("dinov2_vits14", 56, depth=1)  # one block: the export is the slow part
    root, paths = pick_images(textiles, 3)
    probe = load_inspect_model(spec, random_weights=True)
    norms = compute_norms(probe, root, paths).norms
    theta = float(np.quantile(norms, 0.8))  # a minority of ~20 % artifacts in a random model
    im = load_inspect_model(spec, random_weights=True, theta=theta)
    onnx_maps = attention_maps(im, root, paths, backend="onnx", validate=False)  # compared below instead
    torch_maps = attention_maps(im, root, paths, backend="torch")
    assert onnx_maps.backend == "onnx"
    assert onnx_maps.original.shape == (3, 1 + 16)
    assert onnx_maps.artifact_mask.any() and (onnx_maps.artifact_mask == torch_maps.artifact_mask).all()
    np.testing.assert_allclose(onnx_maps.original, torch_maps.original, atol=1e-5)
    np.testing.assert_allclose(onnx_maps.itae, torch_maps.itae, atol=1e-5)
    np.testing.assert_allclose(onnx_maps.original.sum(1), 1, atol=1e-5)  # post-softmax rows, mean over heads
    assert np.abs(onnx_maps.original - onnx_maps.itae).max() > 1e-3  # ITAE changed the CLS row
    out = plot_attention(onnx_maps, tmp_path / "att.png", num_register_tokens=0, grid=(4, 4), title="t")
    _check_png(out, (4 * ATT_PANEL, 3 * ATT_PANEL))


def test_random_weights_and_weights_exclude_each_other(textiles, tmp_path):
    res = CliRunner().invoke(inspect_cli, [str(textiles), "--model", "vits14", "--random-weights", "--weights",
                                           str(tmp_path / "w.pth")])
    assert res.exit_code == 2 and "exclude each other" in res.output


def test_artifact_mask_np_matches_the_torch_op():
    from itae_export.calibrate.inspection import artifact_mask_np
    from itae_export.model.ops import artifact_mask as op

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(5, 30, 8)).astype(np.float32))
    x[0, 3:6] *= 10  # a few large tokens in one image
    for group, code in (("minority", 0), ("below", 1), ("above", 2)):
        for theta in (0.5, 1.0, 3.0, 100.0):
            mask, norms = op(x, theta, 1.0, code)
            np.testing.assert_array_equal(artifact_mask_np(norms.numpy(), theta, group), mask.numpy())
