"""itae-export end to end: the graph, its functions, its manifest, its validation."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
import torch
from tiny import random_model, theta_for_varied_artifacts, tiny_spec

from itae_export.errors import InputError, ToleranceError
from itae_export.onnx.contract import ITAE_DOMAIN, METADATA_KEY
from itae_export.onnx.export import default_output_path, export_onnx
from itae_export.onnx.manifest import read_manifest
from itae_export.onnx.validate import validation_inputs
from itae_export.registry import ITAEOptions
from itae_export.runtime import open_session, run_onnx


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny_reg(tmp_path_factory):
    """A tiny DINOv2-with-registers export with artifacts that differ between images."""
    spec = tiny_spec("dinov2_vits14_reg")
    model = random_model(spec, seed=1)
    theta = theta_for_varied_artifacts(model, spec)
    out = tmp_path_factory.mktemp("exp") / "tiny_reg.onnx"
    result = export_onnx(spec, ITAEOptions(theta=theta), out, model=model, inline=True, attention_output=True)
    return spec, model, result


def test_graph_has_itae_nodes_and_local_functions(tiny_reg):
    _, _, result = tiny_reg
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    domains = {(n.domain, n.op_type) for n in proto.graph.node}
    assert (ITAE_DOMAIN, "ArtifactMask") in domains and (ITAE_DOMAIN, "AttenuateLogits") in domains
    assert {f.name for f in proto.functions} == {"ArtifactMask", "AttenuateLogits"}
    assert [o.name for o in proto.graph.output] == ["embedding", "artifact_mask", "cls_attention"]
    assert proto.graph.input[0].name == "pixel_values"


def test_validation_report_and_varied_artifacts(tiny_reg):
    _, _, result = tiny_reg
    v = result.validation
    assert v["passed"] and v["mask_mismatch"] == 0 and v["rel_max_abs_diff"] <= 1e-4
    assert set(v["batch_sizes"]) == {"1", "3"}
    counts = v["artifacts_per_input"]
    assert len(set(counts)) > 1 and max(counts) > 0, counts  # the mask really varies per image
    assert v["kmeans_ari"] is not None


def test_plain_session_matches_torch_at_batch_1_and_3(tiny_reg):
    spec, model, result = tiny_reg
    x, _ = validation_inputs(result.manifest)
    with torch.no_grad():
        ref = model.forward_features(torch.from_numpy(x))
    for bs in (1, 3):
        got = run_onnx(result.path, x, batch_size=bs)
        scale = ref["embedding"].abs().max().item()
        assert np.abs(got["embedding"] - ref["embedding"].numpy()).max() <= 1e-4 * scale
        np.testing.assert_array_equal(got["artifact_mask"], ref["artifact_mask"].numpy())
        np.testing.assert_allclose(got["cls_attention"], ref["cls_attention"].numpy(), atol=1e-5)
    assert got["artifact_mask"].shape == (len(x), 1 + 4 + 256 - 1)


def test_inlined_copy_gives_same_outputs(tiny_reg):
    _, _, result = tiny_reg
    inl = onnx.load(str(result.inline_path))
    assert not inl.functions and not any(n.domain == ITAE_DOMAIN for n in inl.graph.node)
    x, _ = validation_inputs(result.manifest)
    a, b = run_onnx(result.path, x), run_onnx(result.inline_path, x)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # the copy is sealed with the final manifest over its own graph: every command opens it
    assert read_manifest(result.inline_path, verify=True)["validation"] == result.manifest["validation"]
    open_session(result.inline_path, "cpu")


def test_an_inlined_copy_with_external_weights_opens_and_covers_them(tmp_path):
    spec = tiny_spec("dinov2_vits14")
    r = export_onnx(spec, ITAEOptions(theta=1.0), tmp_path / "m.onnx", model=random_model(spec), resolution=56,
                    inline=True, external_data=True, validate=False)
    assert read_manifest(r.path, verify=True)["external_data_sha256"].keys() == {"m.onnx.data"}
    inl = read_manifest(r.inline_path, verify=True)
    assert inl["external_data_sha256"].keys() == {"m.inline.onnx.data"}
    open_session(r.inline_path, "cpu")
    raw = bytearray((tmp_path / "m.inline.onnx.data").read_bytes())
    raw[-5] ^= 1
    (tmp_path / "m.inline.onnx.data").write_bytes(bytes(raw))
    with pytest.raises(InputError, match="differ from those exported"):
        open_session(r.inline_path, "cpu")
    open_session(r.path, "cpu")  # the graph's own weights are untouched


def test_manifest_sidecar_and_metadata_agree(tiny_reg):
    spec, _, result = tiny_reg
    side = json.loads(result.path.with_suffix(".json").read_text())
    meta = {p.key: p.value for p in onnx.load(str(result.path), load_external_data=False).metadata_props}
    assert json.loads(meta[METADATA_KEY]) == side == read_manifest(result.path)
    assert side["preprocessing"]["mean"] == list(spec.preprocessing.mean)
    assert side["itae"]["theta"] == result.manifest["itae"]["theta"]
    assert side["custom_domain"] == {"name": "itae", "version": 1} and side["opset"] == 18
    assert side["validation"]["passed"] and side["package_version"]
    assert side["num_tokens"] == 261 and side["pos_rule"] == "bicubic-aa"


@pytest.mark.parametrize("family", ["clip_vitb16", "deit3_base16"])
def test_other_families_validate(tmp_path, family):
    spec = tiny_spec(family)
    model = random_model(spec, seed=2)
    theta = theta_for_varied_artifacts(model, spec, quantile=0.3)
    r = export_onnx(spec, ITAEOptions(theta=theta, strategy="neg-inf", lsa=True), tmp_path / "m.onnx", model=model)
    assert r.validation["passed"] and max(r.validation["artifacts_per_input"]) > 0
    assert _session(r.path).get_outputs()[0].shape[1] == spec.embed_dim


@pytest.mark.parametrize("opts", [
    dict(source="key", group="below"),
    dict(source="value", group="above", strategy="mean", rows="all"),
    dict(source="output"),
], ids=["key-below", "value-above-mean-all", "output"])
def test_option_variants_validate(tmp_path, opts):
    spec = tiny_spec("dinov2_vits14")
    model = random_model(spec, seed=3)
    src = opts.get("source", "query")
    if src == "output":  # plain L2 norms of the last block's output tokens
        probe = random_model(spec, seed=3)
        with torch.no_grad():
            x = torch.from_numpy(validation_inputs({"preprocessing": spec.preprocessing.to_dict()})[0])
            tokens = probe.forward_features(x)["x_prenorm"][:, 1:]
        theta = float(np.quantile(tokens.norm(dim=-1).numpy(), 0.8))
    else:
        theta = theta_for_varied_artifacts(model, spec, quantile=0.5, source=src)
    r = export_onnx(spec, ITAEOptions(theta=theta, **opts), tmp_path / "m.onnx", model=model)
    assert r.validation["passed"], r.validation["failure"]
    assert max(r.validation["artifacts_per_input"]) > 0


def test_no_itae_baseline_through_same_path(tmp_path):
    spec = tiny_spec("dinov2_vits14")
    model = random_model(spec)
    r = export_onnx(spec, ITAEOptions(enabled=False), tmp_path / "base.onnx", model=model)
    proto = onnx.load(str(r.path))
    assert not any(n.domain == ITAE_DOMAIN for n in proto.graph.node)
    assert r.validation["passed"] and sum(r.validation["artifacts_per_input"]) == 0
    assert r.manifest["itae"]["enabled"] is False


def test_fp16_keeps_norms_in_float32_and_validates(tmp_path):
    spec = tiny_spec("dinov2_vits14_reg")
    model = random_model(spec, seed=4)
    theta = theta_for_varied_artifacts(model, spec)
    r = export_onnx(spec, ITAEOptions(theta=theta), tmp_path / "h.onnx", model=model, precision="fp16")
    v = r.validation
    assert v["passed"] and v["precision"] == "fp16" and v["finite"]
    assert v["tolerance"]["rel_max_abs_diff"] == pytest.approx(2e-2)
    proto = onnx.load(str(r.path))
    mask_node = next(n for n in proto.graph.node if n.op_type == "ArtifactMask")
    fn = next(f for f in proto.functions if f.name == "ArtifactMask")
    assert fn.node[1].op_type == "Cast" or any(n.op_type == "Cast" for n in fn.node[:3])
    assert mask_node.input  # the norm input is the fp16 projection; the body casts it to float32
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)


def _corrupt_first_matmul(proto):
    init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr *= 1.01
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))


def _nan_weight(proto):
    init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr[...] = np.nan
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))


@pytest.mark.parametrize("precision,tamper,expect", [
    ("fp32", _corrupt_first_matmul, "of the output scale"),
    ("fp16", _nan_weight, "NaN or inf"),
])
def test_failed_validation_leaves_nothing_at_output(tmp_path, monkeypatch, precision, tamper, expect):
    import itae_export.onnx.export as export_mod

    real = export_mod._torch_export

    def tampered(*args, **kwargs):
        proto, location = real(*args, **kwargs)
        tamper(proto)
        return proto, location

    monkeypatch.setattr(export_mod, "_torch_export", tampered)
    spec = tiny_spec("dinov2_vits14")
    out = tmp_path / "bad.onnx"
    with pytest.raises(ToleranceError, match=expect) as e:
        export_onnx(spec, ITAEOptions(theta=1.0), out, model=random_model(spec), precision=precision)
    assert not e.value.report["passed"]
    assert list(tmp_path.iterdir()) == []  # no graph, no manifest, no temporary folder


def test_external_data_is_found_from_another_cwd(tmp_path, monkeypatch):
    spec = tiny_spec("dinov2_vits14")
    r = export_onnx(spec, ITAEOptions(theta=1.0), tmp_path / "ext" / "m.onnx", model=random_model(spec),
                    external_data=True)
    assert (tmp_path / "ext" / "m.onnx.data").is_file() and r.manifest["external_data"] == "m.onnx.data"
    graph = onnx.load(str(r.path), load_external_data=False)
    inline_big = [t.name for t in graph.graph.initializer
                  if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 1024]
    assert not inline_big  # every weight matrix lives in the data file
    monkeypatch.chdir(tmp_path)
    x, _ = validation_inputs(r.manifest)
    assert run_onnx(r.path, x[:2])["embedding"].shape == (2, spec.embed_dim)
    assert read_manifest(r.path)["validation"]["passed"]


def test_default_output_path_names_model_and_options(tmp_path, monkeypatch):
    monkeypatch.setenv("ITAE_EXPORT_DIR", str(tmp_path))
    spec = tiny_spec("dinov2_vits14")
    opts = ITAEOptions(theta=2.5, strategy="mean", lsa=True)
    assert default_output_path(spec, opts).name == "tiny_dinov2_vits14_224_itae-t2p5-mean-lsa.onnx"
    r = export_onnx(spec, opts, model=random_model(spec), validate=False)
    assert r.path == tmp_path / "tiny_dinov2_vits14_224_itae-t2p5-mean-lsa.onnx" and r.path.is_file()
    assert r.manifest["validation"] == {"skipped": True}


def test_bad_resolution_and_precision_are_input_errors(tmp_path):
    spec = tiny_spec("dinov2_vits14")
    with pytest.raises(InputError, match="--resolution"):
        export_onnx(spec, None, tmp_path / "a.onnx", model=random_model(spec), resolution=225)
    with pytest.raises(InputError, match="--precision"):
        export_onnx(spec, None, tmp_path / "a.onnx", model=random_model(spec), precision="int4")


def test_a_resolution_past_128_patches_a_side_is_refused_before_any_work(tmp_path):
    from itae_export.cli.export import main as export_cli
    from itae_export.onnx.export import ExportRequest

    spec = tiny_spec("dinov2_vits14")
    p = spec.arch.patch_size
    assert ExportRequest.make(spec, None, tmp_path / "a.onnx", resolution=128 * p).resolution == 128 * p
    with pytest.raises(InputError, match="129 patches a side, more than 128"):
        export_onnx(spec, None, tmp_path / "a.onnx", model=random_model(spec), resolution=129 * p)
    # a typo of 224 (22400 is not a multiple of 14; 22400 - 22400 % 14 is): one line, exit 2, no download
    res = CliRunner().invoke(export_cli, ["--model", "vits14", "--resolution", str(22400 - 22400 % 14),
                                          "--output", str(tmp_path / "b.onnx")])
    assert res.exit_code == 2 and "patches a side" in res.output and "loading weights" not in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def _validation_input(tmp_path, kind):
    """The same three files (one not an image) as a folder, a path list or a WebDataset tar; (input,
    the names validation reports for a.jpg and sub/b.png)."""
    import tarfile

    from PIL import Image

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "a.jpg")
    Image.new("L", (50, 50), 128).save(folder / "sub" / "b.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    files = ["a.jpg", "sub/b.png", "broken.jpg"]
    if kind == "folder":
        return folder, [str(folder / f) for f in files[:2]]
    if kind == "list":
        lst = tmp_path / "images.txt"
        lst.write_text("".join(f"{folder / f}\n" for f in files))
        return lst, [str(folder / f) for f in files[:2]]
    tar = tmp_path / "images.tar"
    with tarfile.open(tar, "w") as t:
        for f in files:
            t.add(folder / f, arcname=f)
    return tar, [str(tar / "a"), str(tar / "sub" / "b")]  # WebDataset keys: the name without its extension


@pytest.mark.parametrize("kind", ["folder", "list", "tar"])
def test_validate_images_reads_any_input_of_the_source_layer(tmp_path, kind):
    src, want = _validation_input(tmp_path, kind)
    spec = tiny_spec("dinov2_vits14")
    r = export_onnx(spec, ITAEOptions(theta=1.0), tmp_path / "m.onnx", model=random_model(spec),
                    validate_images=src)
    inputs = r.validation["inputs"]
    assert all(name in inputs for name in want), inputs
    assert not any("broken" in name for name in inputs)


def test_validate_images_that_cannot_be_opened_is_one_error_naming_the_option(tmp_path):
    spec = tiny_spec("dinov2_vits14")
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        if bad.name == "empty":
            bad.mkdir()
        with pytest.raises(InputError, match="--validate-images"):
            export_onnx(spec, ITAEOptions(theta=1.0), tmp_path / "n.onnx", model=random_model(spec),
                        validate_images=bad)
    assert not (tmp_path / "n.onnx").exists()


def test_external_data_is_chosen_automatically_above_the_threshold(tmp_path, monkeypatch):
    import itae_export.onnx.export as export_mod

    spec = tiny_spec("dinov2_vits14")
    model = random_model(spec)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", nbytes - 1)  # as ViT-g/14's 4.4 GB is above 1.8 GB
    r = export_onnx(spec, ITAEOptions(theta=1.0), tmp_path / "big.onnx", model=model)
    assert r.manifest["external_data"] == "big.onnx.data" and (tmp_path / "big.onnx.data").is_file()
    assert read_manifest(r.path)["validation"]["passed"]
