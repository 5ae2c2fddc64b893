"""--optimize and --quantize int8 on tiny models: folding, fusions with the itae functions kept,
CLS-only last block, int8 exclusions, and the int8 guard (nothing published when it trips)."""

import copy

import numpy as np
import onnx
import pytest
import torch
from tiny import random_model, theta_for_varied_artifacts, tiny_spec

from itae_export.errors import InputError, ToleranceError
from itae_export.onnx.contract import ITAE_DOMAIN
from itae_export.onnx.export import export_onnx
from itae_export.onnx.manifest import manifest_path
from itae_export.onnx.optimize import (
    FUSION_CANDIDATES,
    FUSION_GROUPS,
    fewest_fp32,
    fold_layerscale_,
    fuse_for_ort,
    mask_source_matmuls,
    quantize_graph,
    quantize_static_int8,
    smooth_activations,
    weight_matmul_layers,
    with_fp32_layers,
)
from itae_export.onnx.validate import validation_inputs
from itae_export.registry import ITAEOptions
from itae_export.runtime import run_onnx

RES = 56  # 4x4 patches: fast, and the int8 check still sees real images


def _spec(name="dinov2_vits14_reg"):
    import dataclasses

    spec = tiny_spec(name)
    return dataclasses.replace(spec, preprocessing=dataclasses.replace(spec.preprocessing, resolution=RES))


@pytest.fixture(scope="module")
def tiny():
    spec = _spec()
    model = random_model(spec, seed=3, layerscale=0.3)
    with torch.no_grad():  # LayerScale values that differ per channel, as in trained DINOv2
        for blk in model.blocks:
            blk.ls1.gamma.uniform_(0.05, 1.0)
            blk.ls2.gamma.uniform_(0.05, 1.0)
    return spec, model, ITAEOptions(theta=theta_for_varied_artifacts(model, spec))


@pytest.fixture(scope="module")
def optimized(tiny, tmp_path_factory):
    spec, model, opts = tiny
    out = tmp_path_factory.mktemp("opt") / "opt.onnx"
    return export_onnx(spec, opts, out, model=copy.deepcopy(model), optimize=True, attention_output=True)


def test_fold_layerscale_keeps_outputs(tiny):
    spec, model, opts = tiny
    from itae_export.model.itae import inject_itae

    ref = inject_itae(copy.deepcopy(model), opts).fix_resolution(RES)
    folded = copy.deepcopy(ref)
    assert fold_layerscale_(folded) == 2 * spec.arch.depth
    x = torch.from_numpy(validation_inputs({"preprocessing": spec.preprocessing.to_dict()})[0])
    with torch.no_grad():
        a, b = ref.forward_features(x), folded.forward_features(x)
    scale = a["embedding"].abs().max()
    assert ((a["embedding"] - b["embedding"]).abs().max() / scale) < 1e-5
    assert torch.equal(a["artifact_mask"], b["artifact_mask"])


def test_cls_only_equals_full_last_block(tiny):
    spec, model, _ = tiny
    from itae_export.model.itae import inject_itae

    x = torch.from_numpy(validation_inputs({"preprocessing": spec.preprocessing.to_dict()})[0])
    for opts in (ITAEOptions(theta=1.0), ITAEOptions(theta=1.0, rows="all", lsa=True, strategy="mean"),
                 ITAEOptions(theta=1.0, source="output"), ITAEOptions(enabled=False)):
        m = inject_itae(copy.deepcopy(model), opts).fix_resolution(RES)
        with torch.no_grad():
            full, cls = m.forward_features(x), m.forward_features(x, cls_only=True)
        torch.testing.assert_close(cls["embedding"], full["embedding"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cls["cls_attention"], full["cls_attention"], rtol=1e-5, atol=1e-6)
        assert torch.equal(cls["artifact_mask"], full["artifact_mask"])


def test_optimized_graph_keeps_itae_functions_and_validates(optimized):
    r = optimized
    proto = onnx.load(str(r.path))
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    assert (ITAE_DOMAIN, "ArtifactMask") in ops and (ITAE_DOMAIN, "AttenuateLogits") in ops
    assert {f.name for f in proto.functions} == {"ArtifactMask", "AttenuateLogits"}
    choice = r.manifest["optimization"]["fusion_choice"]  # the fastest on this CPU, measured at export
    assert choice["chosen"] in choice["seconds_per_run"] and choice["cpu_kind"] and choice["vs_none"] >= 1.0
    assert set(choice["seconds_per_run"]) == {"none", *("+".join(c) for c in FUSION_CANDIDATES)}
    if "attention" in choice["chosen"]:
        assert ("com.microsoft", "MultiHeadAttention") in ops  # the unpatched block is fused
    if "skip_layer_norm" in choice["chosen"]:
        assert ("com.microsoft", "SkipLayerNormalization") in ops
    assert not any(t.name.endswith("gamma") for t in proto.graph.initializer)  # LayerScale folded
    v = r.validation
    assert v["passed"] and v["rel_max_abs_diff"] <= 1e-4 and v["mask_mismatch"] == 0
    assert v["steps"]["exported"]["passed"] and v["steps"]["fused"]["passed"]
    assert r.manifest["optimization"]["layerscale_folded"] == 4
    assert [o.name for o in proto.graph.output] == ["embedding", "artifact_mask", "cls_attention"]


def test_optimized_cls_attention_matches_torch(tiny, optimized):
    spec, model, opts = tiny
    from itae_export.model.itae import inject_itae

    m = inject_itae(copy.deepcopy(model), opts).fix_resolution(RES)
    x, _ = validation_inputs(optimized.manifest)
    got = run_onnx(optimized.path, x, batch_size=3)
    with torch.no_grad():
        ref = m.forward_features(torch.from_numpy(x))
    np.testing.assert_allclose(got["cls_attention"], ref["cls_attention"].numpy(), atol=1e-5)
    assert np.array_equal(got["artifact_mask"], ref["artifact_mask"].numpy())


def test_int8_keeps_mask_source_fp32_and_reports(tiny, tmp_path, monkeypatch):
    spec, model, opts = tiny
    monkeypatch.setattr("itae_export.onnx.optimize.INT8_MIN_ARI", 0.0)  # tiny random nets cluster unstably
    r = export_onnx(spec, opts, tmp_path / "q.onnx", model=copy.deepcopy(model), optimize=True, quantize="int8",
                    int8_images=60)
    q = r.manifest["quantization"]
    assert q["kept_fp32"] and q["weight_matmuls"] > len(q["kept_fp32"])
    proto = onnx.load(str(r.path))
    ops = [n.op_type for n in proto.graph.node]
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    names = {n.name: n.op_type for n in proto.graph.node}
    assert all(names.get(n) == "MatMul" for n in q["kept_fp32"])  # the mask source stayed a float MatMul
    assert {f.name for f in proto.functions} == {"ArtifactMask", "AttenuateLogits"}
    v = q["validation"]
    assert v["passed"] and v["k"] == 10 and "Fashion-MNIST" in v["real_images"]
    assert v["mean_cosine"] > 0.95 and v["mask_agreement"] > 0.9 and v["kmeans_ari"] is not None  # tiny random net
    # what a user loses goes into the manifest too (issue 24)
    assert 0 < v["neighbour_overlap"] <= 1 and 0 < v["centroid_kept"] <= 1 and v["neighbour_overlap_k"] == 10
    assert manifest_path(r.path).is_file()


def test_int8_guard_fails_and_publishes_nothing(tiny, tmp_path, monkeypatch):
    spec, model, opts = tiny
    monkeypatch.setattr("itae_export.onnx.optimize.INT8_MIN_ARI", 1.01)  # no ARI can pass
    out = tmp_path / "q.onnx"
    with pytest.raises(ToleranceError, match="ARI") as e:
        export_onnx(spec, opts, out, model=copy.deepcopy(model), quantize="int8", int8_images=40)
    assert e.value.report["passed"] is False and e.value.report["kmeans_ari"] is not None
    assert "without --quantize int8" in str(e.value)  # the way out is named
    assert list(tmp_path.iterdir()) == []  # no graph, no manifest, no temp dir left


def test_mask_source_is_the_last_qkv(tiny, optimized):
    proto = onnx.load(str(optimized.path))
    found = mask_source_matmuls(proto)
    assert len(found) == 1
    node = next(n for n in proto.graph.node if n.name == found[0])
    w = next(t for t in proto.graph.initializer if t.name == node.input[1])
    d = tiny[0].arch.embed_dim
    assert list(w.dims) == [d, 3 * d]


@pytest.mark.parametrize("kw, wtype", [({}, onnx.TensorProto.INT8), ({"reduce_range": True}, onnx.TensorProto.INT8),
                                      ({"weight_type": "uint8"}, onnx.TensorProto.UINT8)])
def test_int8_weight_variants(optimized, tmp_path, kw, wtype):
    """The variants bench_int8.py compares: int8 weights (full or 7-bit range) or uint8 weights."""
    from onnx import numpy_helper

    from itae_export.onnx.optimize import quantize_int8

    src = tmp_path / "src.onnx"
    src.write_bytes(optimized.path.read_bytes())
    info = quantize_int8(src, tmp_path / "q.onnx", **kw)
    proto = onnx.load(str(tmp_path / "q.onnx"))
    quantized = [t for t in proto.graph.initializer if t.name.endswith("_quantized")]
    assert len(quantized) == info["weight_matmuls"] - len(info["kept_fp32"]) > 0
    assert {t.data_type for t in quantized} == {wtype}
    if wtype == onnx.TensorProto.INT8:  # symmetric: [-127, 127], or [-64, 63] with the 7-bit range
        top = max(int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max()) for t in quantized)
        assert top <= 64 if kw.get("reduce_range") else top > 64
    x, _ = validation_inputs(optimized.manifest, None)
    ref = run_onnx(optimized.path, x)["embedding"]
    got = run_onnx(tmp_path / "q.onnx", x)["embedding"]
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.9
    with pytest.raises(ValueError, match="weight_type"):
        quantize_int8(src, tmp_path / "bad.onnx", weight_type="int4")


def test_quantize_needs_fp32_and_validation(tiny, tmp_path):
    spec, model, opts = tiny
    with pytest.raises(InputError):
        export_onnx(spec, opts, tmp_path / "a.onnx", model=model, quantize="int8", precision="fp16")
    with pytest.raises(InputError):
        export_onnx(spec, opts, tmp_path / "a.onnx", model=model, quantize="int8", validate=False)
    with pytest.raises(InputError):
        export_onnx(spec, opts, tmp_path / "a.onnx", model=model, quantize="int4")


def test_cli_optimize_quantize_flags_in_help():
    from click.testing import CliRunner
    from itae_export.cli.export import main

    out = CliRunner().invoke(main, ["--help"]).output
    assert "--optimize" in out and "--quantize [int8|int8-static]" in out


@pytest.fixture(scope="module")
def folded(tiny, tmp_path_factory):
    """The LayerScale-folded graph without fusions (what --optimize fuses)."""
    spec, model, opts = tiny
    m = copy.deepcopy(model)
    fold_layerscale_(m)
    return export_onnx(spec, opts, tmp_path_factory.mktemp("folded") / "f.onnx", model=m)


def test_fusion_groups_each_alone(folded, tmp_path):
    """Each fusion group rewrites its own pattern only, and the itae functions survive every one."""
    wanted = {"skip_layer_norm": "SkipLayerNormalization", "attention": "MultiHeadAttention", "gelu": "BiasGelu"}
    for group in FUSION_GROUPS:
        out = tmp_path / f"{group}.onnx"
        counts = fuse_for_ort(folded.path, out, groups=(group,))
        proto = onnx.load(str(out))
        ops = {n.op_type for n in proto.graph.node}
        assert {f.name for f in proto.functions} == {"ArtifactMask", "AttenuateLogits"}
        assert wanted[group] in ops and counts, group
        assert not (set(wanted.values()) - {wanted[group]}) & ops, group
        x, _ = validation_inputs(folded.manifest)
        ref, got = run_onnx(folded.path, x), run_onnx(out, x)
        np.testing.assert_allclose(got["embedding"], ref["embedding"], atol=1e-4)
    with pytest.raises(ValueError, match="unknown fusion groups"):
        fuse_for_ort(folded.path, tmp_path / "bad.onnx", groups=("conv",))


def test_weight_matmul_labels_and_static_exclusions(folded, tmp_path):
    """Static QDQ int8: the layers named in keep_fp32 and the mask source stay float MatMuls fed by
    float tensors; every other weight MatMul reads DequantizeLinear outputs."""
    proto = onnx.load(str(folded.path))
    layers = weight_matmul_layers(proto)
    depth = 2
    assert [lab for _, lab in layers] == [f"blocks.{i}.{r}" for i in range(depth)
                                          for r in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    x, _ = validation_inputs(folded.manifest)
    cache = tmp_path / "cal.json"
    info = quantize_static_int8(folded.path, tmp_path / "q.onnx", x, cache=cache, keep_fp32=["blocks.0.mlp.fc2"])
    assert cache.is_file()  # the calibration is kept for the next variant
    q = onnx.load(str(tmp_path / "q.onnx"))
    producer = {o: n.op_type for n in q.graph.node for o in n.output}
    by_name = {n.name: n for n in q.graph.node}
    mask_src = mask_source_matmuls(proto)
    assert mask_src == [layers[4][0]]  # the last block's qkv
    assert set(info["kept_fp32_layers"]) == {"blocks.0.mlp.fc2", "blocks.1.attn.qkv"}
    assert info["quantized"] == len(layers) - 2
    for name, label in layers:
        node = by_name[name]
        fed = {producer.get(i) for i in node.input}
        if label in info["kept_fp32_layers"]:
            assert node.op_type == "MatMul" and "DequantizeLinear" not in fed, label
        else:
            assert fed == {"DequantizeLinear"}, label
    assert {f.name for f in q.functions} == {"ArtifactMask", "AttenuateLogits"}
    got = run_onnx(tmp_path / "q.onnx", x)["embedding"]
    ref = run_onnx(folded.path, x)["embedding"]
    assert ((ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)).min() > 0.9
    # the fast variants of the layer search: every layer float32 again is the fp32 graph, exactly
    names = [n for n, _ in layers]
    back = with_fp32_layers(q, proto, names)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in back.graph.node}
    onnx.save_model(back, str(tmp_path / "back.onnx"))
    np.testing.assert_array_equal(run_onnx(tmp_path / "back.onnx", x)["embedding"], ref)
    one = with_fp32_layers(q, proto, [n for n in names if n != layers[0][0]])  # only blocks.0.attn.qkv int8
    assert sum(n.op_type == "DequantizeLinear" for n in one.graph.node) == 2
    # a second variant from the cached calibration, without images; unknown layers are refused
    quantize_static_int8(folded.path, tmp_path / "q2.onnx", None, cache=cache)
    with pytest.raises(InputError, match="blocks.7.mlp.fc1"):
        quantize_static_int8(folded.path, tmp_path / "q3.onnx", None, cache=cache, keep_fp32=["blocks.7.mlp.fc1"])
    with pytest.raises(InputError, match="calibration"):
        quantize_static_int8(folded.path, tmp_path / "q4.onnx", None, cache=tmp_path / "none.json")


def test_fewest_fp32_is_the_smallest_passing_count():
    calls = []
    for need in (0, 1, 5, 17, 47):
        calls.clear()
        assert fewest_fp32(47, lambda n, need=need: calls.append(n) or n >= need) == need
        assert len(calls) <= 7 and 47 not in calls  # binary search; all-float32 is never built
    assert fewest_fp32(0, lambda n: False) == 0


def test_int8_static_export_publishes_with_its_plan(tiny, tmp_path, monkeypatch):
    spec, model, opts = tiny
    monkeypatch.setattr("itae_export.onnx.optimize.INT8_MIN_ARI", 0.0)  # tiny random nets cluster unstably
    r = export_onnx(spec, opts, tmp_path / "s.onnx", model=copy.deepcopy(model), quantize="int8-static",
                    int8_images=40)
    q = r.manifest["quantization"]
    assert q["type"] == "int8-static" and "QDQ" in q["method"] and q["validation"]["passed"]
    assert q["quantized"] == q["weight_matmuls"] - 1 and q["kept_fp32_layers"] == ["blocks.1.attn.qkv"]
    assert len(q["sensitivity"]) == q["weight_matmuls"] - 1 and q["trials"][0]["fp32_layers"] == 0
    assert "Fashion-MNIST train" in q["calibration"] and q["measured_on"]["cpu_kind"]
    # SmoothQuant ran first, folded into the LayerNorms before qkv and fc1; the mask source was left alone
    assert q["smoothing"]["alpha"] == 0.5 and q["smoothing"]["layers"] == {
        "blocks.0.attn.qkv": "folded", "blocks.0.mlp.fc1": "folded", "blocks.1.mlp.fc1": "folded"}
    assert "DequantizeLinear" in {n.op_type for n in onnx.load(str(r.path)).graph.node}


def test_int8_static_refuses_when_no_layer_can_be_int8(folded, tmp_path, monkeypatch):
    monkeypatch.setattr("itae_export.onnx.optimize.INT8_MIN_ARI", 1.01)  # no ARI can pass the layer selection
    with pytest.raises(ToleranceError, match="no weight MatMul can be int8"):
        quantize_graph("int8-static", folded.path, tmp_path / "s.onnx", folded.manifest, workdir=tmp_path / "w")
    assert not (tmp_path / "s.onnx").exists()


def test_int8_static_guard_refuses_and_publishes_nothing(tiny, tmp_path, monkeypatch):
    """The layer selection passes (its threshold lowered to 0), the guard on other images does not."""
    from itae_export.onnx import optimize

    spec, model, opts = tiny
    plan = optimize.plan_static_int8
    monkeypatch.setattr(optimize, "plan_static_int8", lambda *a, **kw: plan(*a, **kw, min_ari=0.0, margin=0.0))
    monkeypatch.setattr(optimize, "INT8_MIN_ARI", 1.01)
    with pytest.raises(ToleranceError, match="ARI") as e:
        export_onnx(spec, opts, tmp_path / "s.onnx", model=copy.deepcopy(model), quantize="int8-static",
                    int8_images=40)
    assert e.value.report["passed"] is False and e.value.report["kmeans_ari"] is not None
    assert "without --quantize" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_int8_static_reuses_a_plan(folded, tmp_path, monkeypatch):
    import json

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep_fp32": ["blocks.0.mlp.fc2"], "selection": "120 images", "sensitivity": [],
                                "trials": [], "min_ari_selection": 0.97}))
    q = quantize_graph("int8-static", folded.path, tmp_path / "p.onnx", folded.manifest, workdir=tmp_path / "w",
                       plan=plan)
    assert q["kept_fp32_layers"] == ["blocks.0.mlp.fc2", "blocks.1.attn.qkv"] and "plan.json" in q["selection"]
    assert q["quantized"] == q["weight_matmuls"] - 2 and (tmp_path / "p.onnx").is_file()
    plan.write_text("{}")
    with pytest.raises(InputError, match="--int8-plan"):
        quantize_graph("int8-static", folded.path, tmp_path / "bad.onnx", folded.manifest, workdir=tmp_path / "w",
                       plan=plan)


def test_guard_user_measures_by_hand():
    """neighbour_overlap and centroid_kept: 1 for the same embeddings; by hand for a known swap."""
    from itae_export.onnx.optimize import centroid_kept, neighbour_overlap

    # four points on a circle: 0 and 1 close, 2 and 3 close
    ang = np.array([0.0, 0.1, 2.0, 2.1])
    a = np.stack([np.cos(ang), np.sin(ang)], 1)
    assert neighbour_overlap(a, a, 1) == 1.0 and centroid_kept(a, a, 2) == 1.0
    # point 1 moves to 1.2 rad. Nearest under b: 0 -> 1 (1.2 rad against 2.0), 1 -> 2 (0.8), 2 -> 3,
    # 3 -> 2; under a: 1, 0, 3, 2: one of four lists changed.
    b = a.copy()
    b[1] = [np.cos(1.2), np.sin(1.2)]
    assert neighbour_overlap(a, b, 1) == 0.75
    # K-Means on a: centroids at 0.05 and 2.05 rad; 1.2 rad is nearer 2.05 (0.85 against 1.15)
    assert centroid_kept(a, b, 2) == 0.75
    with pytest.raises(InputError, match="2 rows"):
        neighbour_overlap(a[:1], b[:1])


def test_smooth_activations_is_exact_and_rescues_an_outlier_channel(folded, tmp_path):
    """SmoothQuant migration: the same function in float32 (embeddings to rounding, the artifact
    mask exactly), the LayerNorm gammas and betas divided by s, fc2 through an inserted Mul; and on
    a graph with one outlier channel after a LayerNorm (as trained ViTs have), the all-int8 static
    graph of the smoothed graph is far closer to float32 than that of the unsmoothed one."""
    from onnx import numpy_helper

    proto = onnx.load(str(folded.path))
    labels = dict(weight_matmul_layers(proto))
    ln = next(n for n in proto.graph.node if n.op_type == "LayerNormalization"
              and any(m.input[0] == n.output[0] and labels.get(m.name) == "blocks.0.attn.qkv" for m in proto.graph.node))
    init = {t.name: t for t in proto.graph.initializer}
    g = numpy_helper.to_array(init[ln.input[1]]).copy()
    g[3] *= 40.0  # one channel 40x larger than the rest, as the outlier channels of trained ViTs
    init[ln.input[1]].CopyFrom(numpy_helper.from_array(g, ln.input[1]))
    planted = tmp_path / "planted.onnx"
    onnx.save_model(proto, str(planted))

    x, _ = validation_inputs(folded.manifest)
    cal = x[: len(x) // 2]
    done = smooth_activations(planted, tmp_path / "smooth.onnx", cal)
    assert done == {"blocks.0.attn.qkv": "folded", "blocks.0.mlp.fc1": "folded", "blocks.1.mlp.fc1": "folded"}
    sm = onnx.load(str(tmp_path / "smooth.onnx"))
    g2 = numpy_helper.to_array({t.name: t for t in sm.graph.initializer}[ln.input[1]])
    assert abs(g2[3] / g2).max() < abs(g[3] / g).max() / 4  # the outlier channel was moved into the weights
    ref, got = run_onnx(planted, x), run_onnx(tmp_path / "smooth.onnx", x)
    np.testing.assert_allclose(got["embedding"], ref["embedding"], rtol=1e-4, atol=1e-4 * np.abs(ref["embedding"]).max())
    np.testing.assert_array_equal(got["artifact_mask"], ref["artifact_mask"])
    with_mul = smooth_activations(planted, tmp_path / "mul.onnx", cal, layers=("mlp.fc2",))
    assert with_mul == {"blocks.0.mlp.fc2": "mul", "blocks.1.mlp.fc2": "mul"}
    assert sum(n.op_type == "Mul" and n.name.endswith(".smooth") for n in onnx.load(str(tmp_path / "mul.onnx")).graph.node) == 2
    got = run_onnx(tmp_path / "mul.onnx", x)
    np.testing.assert_allclose(got["embedding"], ref["embedding"], rtol=1e-4, atol=1e-4 * np.abs(ref["embedding"]).max())

    def int8_damage(src, name):
        quantize_static_int8(src, tmp_path / f"{name}.q.onnx", cal, cache=tmp_path / f"{name}.json")
        q = run_onnx(tmp_path / f"{name}.q.onnx", x)["embedding"]
        cos = (q * ref["embedding"]).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(ref["embedding"], axis=1)
        return float(1 - cos.mean())

    plain, smoothed = int8_damage(planted, "plain"), int8_damage(tmp_path / "smooth.onnx", "smooth")
    assert smoothed < plain / 2, (smoothed, plain)


def test_smooth_activations_keeps_external_data_beside_the_graph(folded, tmp_path):
    """A graph whose weights live in a .data file (ViT-L and up) is smoothed into a graph that
    keeps them in its own .data file (a single protobuf would pass the 2 GB limit for ViT-g)."""
    (tmp_path / "ext").mkdir()
    src = tmp_path / "ext" / "m.onnx"
    onnx.save_model(onnx.load(str(folded.path)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=1024)
    x, _ = validation_inputs(folded.manifest)
    (tmp_path / "out").mkdir()
    done = smooth_activations(src, tmp_path / "out" / "s.onnx", x)
    assert set(done.values()) == {"folded"}
    assert (tmp_path / "out" / "s.onnx.data").is_file()
    g = onnx.load(str(tmp_path / "out" / "s.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.graph.initializer)
    ref, got = run_onnx(src, x), run_onnx(tmp_path / "out" / "s.onnx", x)
    np.testing.assert_allclose(got["embedding"], ref["embedding"], rtol=1e-4, atol=1e-4 * np.abs(ref["embedding"]).max())
    np.testing.assert_array_equal(got["artifact_mask"], ref["artifact_mask"])
    assert not [p.name for p in (tmp_path / "ext").iterdir() if ".taps." in p.name]  # the tap copy is gone
