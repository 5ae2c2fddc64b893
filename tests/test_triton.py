"""The Triton model repository: layout, and config.pbtxt parsed with Triton's own protobuf definitions."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed")

from google.protobuf import text_format
from tiny import random_model, tiny_spec
from tritonclient.grpc import model_config_pb2 as pb

from itae_export.errors import InputError
from itae_export.onnx.export import export_onnx
from itae_export.onnx.preprocess_graph import export_in_graph
from itae_export.onnx.triton import check_config, write_triton_repository
from itae_export.registry import ITAEOptions


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    spec = tiny_spec("dinov2_vits14_reg")
    d = tmp_path_factory.mktemp("triton")
    r = export_onnx(spec, ITAEOptions(theta=1.0), d / "enc.onnx", model=random_model(spec, seed=2), resolution=56,
                    validate=False, external_data=True)
    img = export_in_graph(r.path, validate=False)
    return r, img


def test_plain_repository(exported, tmp_path):
    r, _ = exported
    folder = write_triton_repository(r.path, tmp_path / "repo", name="itae_tiny", max_batch_size=16)
    assert (folder / "1" / "model.onnx").is_file() and (folder / "1" / "enc.onnx.data").is_file()
    cfg = text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16 and cfg.HasField("dynamic_batching")
    inputs = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input}
    outputs = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in cfg.output}
    assert inputs == {"pixel_values": ("TYPE_FP32", [3, 56, 56])}
    n_tokens = r.manifest["num_tokens"]
    assert outputs == {"embedding": ("TYPE_FP32", [64]), "artifact_mask": ("TYPE_BOOL", [n_tokens - 1])}
    # the copied graph runs from its new place (external data found beside it)
    from itae_export.runtime import run_onnx

    x = np.random.default_rng(0).standard_normal((2, 3, 56, 56), dtype=np.float32)
    np.testing.assert_array_equal(run_onnx(folder / "1" / "model.onnx", x)["embedding"], run_onnx(r.path, x)["embedding"])
    assert check_config(folder)["outputs"]["artifact_mask"][0] == "TYPE_BOOL"


def test_in_graph_repository(exported, tmp_path):
    _, img = exported
    folder = write_triton_repository(img.path, tmp_path / "repo")
    assert folder.name == "enc_image"
    cfg = text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input] == [("image", "TYPE_UINT8", [-1, -1, 3])]


def test_check_config_catches_a_wrong_type(exported, tmp_path):
    r, _ = exported
    folder = write_triton_repository(r.path, tmp_path / "repo", name="m")
    cfg = folder / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("TYPE_BOOL", "TYPE_UINT8"))
    with pytest.raises(InputError, match="artifact_mask: TYPE_UINT8 but the graph has tensor\\(bool\\)"):
        check_config(folder)
    cfg.write_text("name: m\nnot_a_field: 3\n")
    with pytest.raises(InputError, match="does not parse"):
        check_config(folder)


def test_bad_name(exported, tmp_path):
    with pytest.raises(InputError, match="model name"):
        write_triton_repository(exported[0].path, tmp_path, name="a b")
