"""The in-graph preprocessing variant: uint8 images in, validated against PyTorch with the same resize."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny import random_model, theta_for_varied_artifacts, tiny_spec

from itae_export.errors import InputError, ToleranceError
from itae_export.images import PreprocessSpec, pil_resize
from itae_export.onnx.contract import IMAGE_INPUT_NAME
from itae_export.onnx.export import export_onnx
from itae_export.onnx.manifest import read_manifest
from itae_export.onnx.preprocess_graph import (
    build_preprocess_graph,
    export_in_graph,
    reference_resize,
)
from itae_export.registry import ITAEOptions
from itae_export.runtime import ort_session as onnx_session
from itae_export.runtime import run_onnx


def _ort(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


SIZES = [(427, 640), (97, 61), (224, 300), (41, 500), (2, 500), (224, 224), (1, 1), (223, 225), (552, 97)]


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_resize_graph_equals_pytorch_bit_for_bit_and_pillow_within_one_level(interp):
    pre = PreprocessSpec(224, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), interpolation=interp)
    sess = _ort(build_preprocess_graph(pre))
    rng = np.random.default_rng(1)
    near = total = 0
    for h, w in SIZES:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = reference_resize(a, 224, 224, "cubic" if interp == "bicubic" else "linear")
        (got,) = sess.run(None, {IMAGE_INPUT_NAME: a[None]})
        lut = (np.arange(256, dtype=np.float32) * np.float32(pre.scale) - np.float32(0.485)) / np.float32(0.229)
        np.testing.assert_array_equal(got[0, 0], lut[ref[..., 0]])  # the same float32 normalisation
        pil = np.asarray(pil_resize(Image.fromarray(a), pre)).astype(int)
        d = np.abs(ref.astype(int) - pil)
        if min(h, w) > 2:  # an extreme 2-pixel upscale differs by 2 levels
            assert d.max() <= 1, (h, w)
        near += int((d > 0).sum())
        total += d.size
    assert near / total < 2e-3  # float32 against Pillow's float64 filter weights


def test_preprocess_graph_rejects_lanczos():
    pre = PreprocessSpec(224, 224, (0.5,) * 3, (0.5,) * 3, interpolation="lanczos")
    with pytest.raises(InputError, match="lanczos"):
        build_preprocess_graph(pre)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    spec = tiny_spec("dinov2_vits14_reg")
    model = random_model(spec, seed=5)
    theta = theta_for_varied_artifacts(model, spec)
    out = tmp_path_factory.mktemp("ingraph") / "m.onnx"
    r = export_onnx(spec, ITAEOptions(theta=theta), out, model=model, resolution=56, validate=False)
    return r, model


def test_in_graph_variant_validates_against_pytorch(encoder):
    r, model = encoder
    res = export_in_graph(r.path, model=model)
    assert res.path.name == "m_image.onnx" and res.path.is_file()
    v = res.manifest["validation"]
    assert v["passed"] and v["pixel_mismatch"] == 0 and v["mask_mismatch"] == 0
    assert sum(v["artifacts_per_input"]) > 0  # the masks are not trivially empty
    assert v["batches"][-1] == 3
    assert read_manifest(res.path)["inputs"][0] == {"name": "image", "dtype": "uint8",
                                                    "shape": ["batch", "height", "width", 3]}
    # the itae functions came along, and the graph's own metadata carries the new manifest
    import json

    import onnx

    proto = onnx.load(str(res.path))
    assert {f.domain for f in proto.functions} == {"itae"}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["itae.manifest"])["preprocessing_in_graph"]["resize"]["cubic_coeff_a"] == -0.5
    # same embedding as the plain graph fed the same pixels
    img = np.random.default_rng(0).integers(0, 256, (150, 90, 3), dtype=np.uint8)
    e_img, m_img = onnx_session(res.path).run(None, {"image": img[None]})
    from itae_export.onnx.preprocess_graph import reference_pixels

    plain = run_onnx(r.path, reference_pixels([img], PreprocessSpec.from_manifest(r.manifest["preprocessing"])))
    assert np.abs(e_img - plain["embedding"]).max() <= 1e-5 * np.abs(plain["embedding"]).max()
    np.testing.assert_array_equal(m_img, plain["artifact_mask"])


def test_in_graph_validation_fails_on_a_different_model(encoder, tmp_path):
    r, model = encoder
    other = random_model(tiny_spec("dinov2_vits14_reg"), seed=99)
    from itae_export.model.itae import inject_itae

    inject_itae(other, ITAEOptions(**{k: r.manifest["itae"][k] for k in ("theta",)}))
    other.fix_resolution(r.manifest["preprocessing"]["resolution"][0])
    out = tmp_path / "x_image.onnx"
    with pytest.raises(ToleranceError, match="validation failed"):
        export_in_graph(r.path, out, model=other.float().eval())
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


def test_in_graph_refuses_an_in_graph_model(encoder, tmp_path):
    r, model = encoder
    res = export_in_graph(r.path, tmp_path / "a.onnx", validate=False)
    with pytest.raises(InputError, match="already in-graph"):
        export_in_graph(res.path, tmp_path / "b.onnx", validate=False)
