"""A non-Python consumer: Node.js with onnxruntime-node runs an exported model, no custom-op library."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tiny import random_model, theta_for_varied_artifacts, tiny_spec

from itae_export.onnx.export import export_onnx
from itae_export.onnx.validate import validation_inputs
from itae_export.registry import ITAEOptions
from itae_export.runtime import run_onnx

pytestmark = pytest.mark.node
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"


@pytest.fixture(scope="module")
def node_example():
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("Node.js or npm is not installed")
    if not (EXAMPLE / "node_modules" / "onnxruntime-node").is_dir():
        # the install script of onnxruntime-node downloads CUDA binaries; the CPU binary is in the package
        try:
            subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=EXAMPLE,
                           check=True, capture_output=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"npm could not install onnxruntime-node (offline?): {type(e).__name__}")
    return EXAMPLE / "embed.mjs"


def test_node_embedding_equals_python_ort(node_example, tmp_path):
    spec = tiny_spec("dinov2_vits14_reg")
    model = random_model(spec, seed=11)
    r = export_onnx(spec, ITAEOptions(theta=theta_for_varied_artifacts(model, spec)), tmp_path / "m.onnx", model=model)
    x, _ = validation_inputs(r.manifest)
    x = x[:5]
    (tmp_path / "x.f32").write_bytes(x.astype("<f4").tobytes())
    proc = subprocess.run(["node", str(node_example), str(r.path), str(tmp_path / "x.f32")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    ref = run_onnx(r.path, x)
    emb = np.asarray(got["embedding"], dtype=np.float32)
    assert emb.shape == ref["embedding"].shape
    assert np.abs(emb - ref["embedding"]).max() <= 1e-5
    np.testing.assert_array_equal(np.asarray(got["artifact_mask"]), ref["artifact_mask"])
    assert got["manifest"]["theta"] == r.manifest["itae"]["theta"]


def test_node_rejects_wrong_input_size(node_example, tmp_path):
    spec = tiny_spec("dinov2_vits14")
    r = export_onnx(spec, ITAEOptions(theta=1.0), tmp_path / "m.onnx", model=random_model(spec), validate=False)
    (tmp_path / "bad.f32").write_bytes(np.zeros(10, "<f4").tobytes())
    proc = subprocess.run(["node", str(node_example), str(r.path), str(tmp_path / "bad.f32")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bad.f32" in proc.stderr


def test_node_in_graph_variant_equals_python_ort(node_example, tmp_path):
    """The --preprocess-in-graph variant fed decoded RGB bytes from Node.js, against Python ORT."""
    from itae_export.onnx.preprocess_graph import export_in_graph
    from itae_export.runtime import ort_session as onnx_session

    spec = tiny_spec("dinov2_vits14")
    model = random_model(spec, seed=3)
    r = export_onnx(spec, ITAEOptions(theta=theta_for_varied_artifacts(model, spec)), tmp_path / "m.onnx",
                    model=model, resolution=56, validate=False)
    img = export_in_graph(r.path, model=model)  # validated against PyTorch with the same resize
    rgb = np.random.default_rng(4).integers(0, 256, (2, 131, 77, 3), dtype=np.uint8)
    (tmp_path / "x.u8").write_bytes(rgb.tobytes())
    proc = subprocess.run(["node", str(node_example), str(img.path), str(tmp_path / "x.u8"), "131", "77"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    emb_ref, mask_ref = onnx_session(img.path).run(None, {"image": rgb})
    emb = np.asarray(got["embedding"], dtype=np.float32)
    assert np.abs(emb - emb_ref).max() <= 1e-5 * np.abs(emb_ref).max()
    np.testing.assert_array_equal(np.asarray(got["artifact_mask"]), mask_ref)
    assert mask_ref.any() and (got["mask_type"], got["mask_data"]) == ("bool", "Uint8Array")
