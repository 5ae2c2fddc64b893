"""One truth for the model (issue 22): the manifest inside the graph, the graph's flat metadata,
the sidecar and the integrity digest agree, and the graph's outputs have the shapes the manifest
records; otherwise every command that opens the model stops with one line naming what differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from itae_export.cli.cluster import main as cluster_cli
from itae_export.cli.validate import main as validate_cli
from itae_export.errors import InputError
from itae_export.onnx.contract import METADATA_KEY
from itae_export.onnx.manifest import (INTEGRITY_KEY, first_difference, integrity_digest, read_manifest, reseal,
                                       seal)
from itae_export.runtime import open_session


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import imagefolders

    root = tmp_path_factory.mktemp("imgs") / "photos"
    imagefolders.fashion_folder(root, per_class=2, classes=2)
    return root


def _copy(tiny_model: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_model, dest)
    shutil.copy(tiny_model.with_suffix(".json"), dest.with_suffix(".json"))
    return dest


def _meta(proto) -> dict:
    return {p.key: p.value for p in proto.metadata_props}


def _set(proto, key, value) -> None:
    for p in proto.metadata_props:
        if p.key == key:
            p.value = value


def _one_line(res, *needles):
    assert res.exit_code == 1, (res.exit_code, res.output)
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    for n in needles:
        assert n in errors[0], res.output


def _cluster(images, model, tmp_path):
    return CliRunner().invoke(cluster_cli, [str(images), "--k", "2", "--onnx", str(model), "--out",
                                            str(tmp_path / "out"), "--quiet", "--workers", "1"])


def test_an_export_is_sealed(tiny_model):
    proto = onnx.load(str(tiny_model), load_external_data=False)
    meta = _meta(proto)
    assert meta[INTEGRITY_KEY] == integrity_digest(proto)
    assert json.loads(meta["itae.preprocessing"]) == json.loads(meta[METADATA_KEY])["preprocessing"]
    assert read_manifest(tiny_model, verify=True) == json.loads(meta[METADATA_KEY])
    open_session(tiny_model, "cpu")


def test_mean_edited_inside_the_embedded_manifest(tiny_model, images, tmp_path):
    """The attack of the issue: only the embedded manifest's mean is changed (the sidecar too)."""
    model = _copy(tiny_model, tmp_path / "m" / "model.onnx")
    proto = onnx.load(str(model))
    manifest = json.loads(_meta(proto)[METADATA_KEY])
    manifest["preprocessing"]["mean"] = [0.1, 0.2, 0.3]
    _set(proto, METADATA_KEY, json.dumps(manifest, sort_keys=True))
    onnx.save(proto, str(model))
    model.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"'preprocessing\.mean[.0-9]*' differs"):
        read_manifest(model)
    _one_line(_cluster(images, model, tmp_path), "preprocessing.mean")
    _one_line(CliRunner().invoke(validate_cli, [str(model)]), "preprocessing.mean")

    # the flat copy edited as well: the digest written at export no longer matches
    _set(proto, "itae.preprocessing", json.dumps(manifest["preprocessing"], sort_keys=True))
    onnx.save(proto, str(model))
    read_manifest(model)  # the copies agree ...
    with pytest.raises(InputError, match="integrity digest"):
        read_manifest(model, verify=True)
    _one_line(_cluster(images, model, tmp_path), "integrity digest")
    _one_line(CliRunner().invoke(validate_cli, [str(model)]), "integrity digest")


@pytest.mark.parametrize("key", ["itae.model", "itae.theta", "itae.enabled"])
def test_other_flat_fields_are_compared(tiny_model, tmp_path, key):
    model = _copy(tiny_model, tmp_path / "model.onnx")
    proto = onnx.load(str(model))
    _set(proto, key, "something else")
    onnx.save(proto, str(model))
    with pytest.raises(InputError, match=f"'{key}' differs"):
        read_manifest(model)


def test_a_changed_graph_is_refused(tiny_model, images, tmp_path):
    """Bytes of the weights changed after export, metadata untouched."""
    model = _copy(tiny_model, tmp_path / "model.onnx")
    proto = onnx.load(str(model))
    init = next(t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
    onnx.save(proto, str(model))
    _one_line(_cluster(images, model, tmp_path), "integrity digest")
    reseal(proto)  # an intended change, resealed, opens again
    onnx.save(proto, str(model))
    open_session(model, "cpu")


def test_a_graph_without_digest_is_refused(tiny_model, tmp_path):
    model = _copy(tiny_model, tmp_path / "model.onnx")
    proto = onnx.load(str(model))
    keep = [p for p in proto.metadata_props if p.key != INTEGRITY_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    onnx.save(proto, str(model))
    with pytest.raises(InputError, match="no integrity digest"):
        open_session(model, "cpu")


def _foreign_graph(dim: int, tokens: int, res: int = 56):
    """A contract-abiding graph that is not the model: embedding [n, dim], mask [n, tokens]."""
    nodes = [helper.make_node("ReduceMean", ["pixel_values", "axes"], ["m"], keepdims=0),
             helper.make_node("Reshape", ["m", "shape"], ["flat"]),
             helper.make_node("Slice", ["flat", "starts", "ends_e", "axes1"], ["embedding"]),
             helper.make_node("Slice", ["flat", "starts", "ends_m", "axes1"], ["s"]),
             helper.make_node("Greater", ["s", "zero"], ["artifact_mask"])]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axes"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
             numpy_helper.from_array(np.array([0], np.int64), "starts"),
             numpy_helper.from_array(np.array([dim], np.int64), "ends_e"),
             numpy_helper.from_array(np.array([tokens], np.int64), "ends_m"),
             numpy_helper.from_array(np.array([1], np.int64), "axes1"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    graph = helper.make_graph(nodes, "foreign",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["n", 3, res, res])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", dim]),
                               helper.make_tensor_value_info("artifact_mask", TensorProto.BOOL, ["n", tokens])],
                              inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    return proto


def test_a_foreign_graph_with_a_copied_manifest_is_refused(tiny_model, images, tmp_path):
    manifest = read_manifest(tiny_model)
    dim, tokens = manifest["embed_dim"], manifest["num_tokens"] - 1
    model = tmp_path / "foreign.onnx"
    proto = _foreign_graph(dim + 5, tokens)
    seal(proto, manifest)  # even sealed: the shapes give it away
    onnx.save(proto, str(model))
    with pytest.raises(InputError, match=rf"output 'embedding' axis 1 is {dim + 5}, the manifest says {dim}"):
        open_session(model, "cpu")
    _one_line(_cluster(images, model, tmp_path), "does not match its manifest", "embedding")

    proto = _foreign_graph(dim, tokens + 1)
    seal(proto, manifest)
    onnx.save(proto, str(model))
    with pytest.raises(InputError, match="artifact_mask"):
        open_session(model, "cpu")

    # the manifest edited to the foreign dim: embed_dim and its own outputs disagree
    edited = json.loads(json.dumps(manifest))
    edited["embed_dim"] = dim + 5
    proto = _foreign_graph(dim, tokens)
    seal(proto, edited)
    onnx.save(proto, str(model))
    with pytest.raises(InputError, match="embed_dim"):
        open_session(model, "cpu")


def test_a_field_on_one_side_only_is_reported(tiny_model, tmp_path):
    """Planted bug: first_difference skipping keys that only one side has."""
    assert first_difference({"a": 1}, {"a": 1, "b": 2}) == "b"
    assert first_difference({"a": {"x": 1, "y": 2}}, {"a": {"x": 1}}) == "a.y"
    assert first_difference({"a": [1, 2]}, {"a": [1, 2, 3]}) == "a"
    assert first_difference({"a": [1, {"z": 0}]}, {"a": [1, {}]}) == "a.1.z"
    assert first_difference({"a": 1}, {"a": 1}) is None
    model = _copy(tiny_model, tmp_path / "model.onnx")
    side = json.loads(model.with_suffix(".json").read_text())
    side["preprocessing"]["extra"] = 1
    model.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(InputError, match=r"field 'preprocessing\.extra' differs"):
        read_manifest(model)
    del side["preprocessing"]["extra"]
    del side["preprocessing"]["std"]
    model.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(InputError, match=r"field 'preprocessing\.std' differs"):
        read_manifest(model)


def test_itae_validate_refuses_a_consistently_edited_mean_of_a_registered_model(tiny_model, tmp_path):
    """Every copy edited and the graph resealed: the registry is the second source for a
    registered model, so itae-validate still fails, naming the field."""
    model = _copy(tiny_model, tmp_path / "model.onnx")
    proto = onnx.load(str(model))
    manifest = json.loads(_meta(proto)[METADATA_KEY])
    manifest["model"] = "dinov2_vits14"  # a registered name: its mean and std are known
    for mean, needle in ((manifest["preprocessing"]["mean"], "weights"), ([0.5, 0.5, 0.5], "preprocessing.mean")):
        manifest["preprocessing"]["mean"] = mean
        seal(proto, manifest)
        onnx.save(proto, str(model))
        model.with_suffix(".json").write_text(json.dumps(manifest))
        res = CliRunner().invoke(validate_cli, [str(model)])
        _one_line(res, needle)
        if needle == "weights":  # the unedited one gets past the preprocessing check
            assert "preprocessing" not in res.output


@pytest.mark.parametrize("edit,field", [
    (lambda m: m["preprocessing"].__setitem__("mean", "0.5"), "preprocessing.mean"),
    (lambda m: m["preprocessing"].__setitem__("std", [0.2, 0.0, 0.2]), "preprocessing.std"),
    (lambda m: m["preprocessing"].__setitem__("std", [0.2, float("nan"), 0.2]), "preprocessing.std"),
    (lambda m: m["preprocessing"].__setitem__("resolution", [56]), "preprocessing.resolution"),
    (lambda m: m.pop("preprocessing"), "preprocessing"),
    (lambda m: m.__setitem__("embed_dim", "64"), "embed_dim"),
    (lambda m: m["itae"].__setitem__("theta", None), "itae"),
    (lambda m: m.__setitem__("outputs", {}), "outputs"),
    (lambda m: m.__setitem__("schema", 99), "schema"),
])
def test_a_forged_manifest_is_one_line(tiny_model, images, tmp_path, edit, field):
    """Sealed, flat copies consistent, no sidecar: the manifest itself is malformed."""
    model = tmp_path / "model.onnx"
    shutil.copy(tiny_model, model)
    proto = onnx.load(str(model))
    manifest = json.loads(_meta(proto)[METADATA_KEY])
    edit(manifest)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(manifest)
    reseal_entry = proto.metadata_props.add()
    reseal_entry.key, reseal_entry.value = INTEGRITY_KEY, ""
    reseal(proto)
    onnx.save(proto, str(model))
    with pytest.raises(InputError, match=field):
        read_manifest(model)
    _one_line(_cluster(images, model, tmp_path), field)


def test_triton_and_in_graph_build_only_on_an_intact_graph(tiny_model, tmp_path):
    from itae_export.onnx.preprocess_graph import export_in_graph
    from itae_export.onnx.triton import write_triton_repository

    model = _copy(tiny_model, tmp_path / "model.onnx")
    proto = onnx.load(str(model))
    init = next(t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1.0, init.name))
    onnx.save(proto, str(model))
    with pytest.raises(InputError, match="integrity digest"):
        write_triton_repository(model, tmp_path / "repo", check=False)
    with pytest.raises(InputError, match="integrity digest"):
        export_in_graph(model, validate=False)
    assert not (tmp_path / "repo" / "model").exists() and not (tmp_path / "model_image.onnx").exists()


# ------------------------------------------------- external weights: the digest covers the .data file


@pytest.fixture(scope="module")
def external_model(tmp_path_factory):
    """A tiny model exported with its weights in ``model.onnx.data`` beside the graph."""
    from tiny import random_model, tiny_spec

    from itae_export.onnx.export import export_onnx
    from itae_export.registry import ITAEOptions

    spec = tiny_spec("dinov2_vits14")
    out = tmp_path_factory.mktemp("external") / "model.onnx"
    export_onnx(spec, ITAEOptions(theta=1.0), out, model=random_model(spec), resolution=56, external_data=True,
                validate=False)
    return out


def _flip_weights(data: Path) -> None:
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))


def _same_size_other_weights(data: Path) -> None:
    data.write_bytes(np.random.default_rng(0).standard_normal(data.stat().st_size // 4).astype(np.float32).tobytes())


WEIGHT_FAULTS = [  # (name, what is done to model.onnx.data, what the one line says)
    ("a flipped byte", _flip_weights, "differ from those exported"),
    ("replaced, same size", _same_size_other_weights, "differ from those exported"),
    ("missing", lambda data: data.unlink(), "its weight file model.onnx.data is not beside it"),
]


def _open_cluster(model, images, tmp_path):
    return _cluster(images, model, tmp_path)


def _open_embed(model, images, tmp_path):
    pytest.importorskip("pyarrow")
    from itae_export.cli.embed import main as embed_cli

    return CliRunner().invoke(embed_cli, ["run", str(images), "--out", str(tmp_path / "shards"), "--onnx", str(model),
                                          "--workers", "1"])


def _open_validate(model, images, tmp_path):
    return CliRunner().invoke(validate_cli, [str(model)])


def _open_triton(model, images, tmp_path):
    from itae_export.cli.export import main as export_cli  # noqa: F401 - the same error boundary
    from itae_export.onnx.triton import write_triton_repository

    write_triton_repository(model, tmp_path / "repo", check=False)


def _open_in_graph(model, images, tmp_path):
    from itae_export.onnx.preprocess_graph import export_in_graph

    export_in_graph(model, validate=False)


OPENERS = [("itae-cluster", _open_cluster), ("itae-embed run", _open_embed), ("itae-validate", _open_validate),
           ("triton repository", _open_triton), ("in-graph variant", _open_in_graph)]


@pytest.mark.parametrize("fault,edit,needle", WEIGHT_FAULTS, ids=[f[0] for f in WEIGHT_FAULTS])
@pytest.mark.parametrize("opener", OPENERS, ids=[o[0] for o in OPENERS])
def test_changed_external_weights_are_refused_by_every_opener(external_model, images, tmp_path, fault, edit, needle,
                                                              opener):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in external_model.parent.iterdir():
        shutil.copy(f, folder / f.name)
    model = folder / "model.onnx"
    assert read_manifest(model)["external_data_sha256"].keys() == {"model.onnx.data"}
    edit(folder / "model.onnx.data")
    name, run = opener
    if name.startswith("itae-"):
        _one_line(run(model, images, tmp_path), needle)
    else:
        with pytest.raises(InputError, match=needle):
            run(model, images, tmp_path)
    assert not (tmp_path / "out" / "summary.json").exists() and not (tmp_path / "repo" / "model").exists()
    assert not (folder / "model_image.onnx").exists()


def test_intact_external_weights_open_and_the_in_graph_variant_records_its_own(external_model, tmp_path):
    from itae_export.onnx.preprocess_graph import export_in_graph

    folder = tmp_path / "m"
    shutil.copytree(external_model.parent, folder)
    open_session(folder / "model.onnx", "cpu")
    r = export_in_graph(folder / "model.onnx", validate=False)
    assert read_manifest(r.path, verify=True)["external_data_sha256"].keys() == {"model_image.onnx.data"}
    _flip_weights(folder / "model_image.onnx.data")
    with pytest.raises(InputError, match="differ from those exported"):
        read_manifest(r.path, verify=True)


def test_an_external_weights_graph_without_their_digest_is_refused(external_model, tmp_path):
    """An export of an earlier version (no digest of its weights in the manifest), resealed."""
    folder = tmp_path / "m"
    shutil.copytree(external_model.parent, folder)
    model = folder / "model.onnx"
    proto = onnx.load(str(model), load_external_data=False)
    m = json.loads(_meta(proto)[METADATA_KEY])
    del m["external_data_sha256"]
    seal(proto, m)
    onnx.save(proto, str(model))
    (folder / "model.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="records no digest of its weight file"):
        open_session(model, "cpu")
