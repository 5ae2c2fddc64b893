"""Clustering heads (TSP, TEMI): losses against hand computations, determinism, export + append."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from itae_export.cluster.heads import (  # noqa: E402
    ClusteringHead,
    beta_pmi,
    fit_head,
    nearest_neighbors,
    temi_loss,
    tsp_loss,
    tsp_neighbor_weights,
)
from itae_export.cluster.metrics import cluster_accuracy  # noqa: E402
from itae_export.errors import InputError, ToleranceError  # noqa: E402


def blobs(n_per=60, k=4, dim=12, spread=0.15, seed=0):
    """Well-separated clusters on directions (they survive L2 normalisation)."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:k] * 3
    x = np.concatenate([c + spread * 3 * rng.normal(size=(n_per, dim)) for c in centres])
    y = np.repeat(np.arange(k), n_per)
    return x.astype(np.float32), y


# ---------------------------------------------------------------- neighbours and TSP weights

def test_nearest_neighbors_excludes_self_even_with_duplicates():
    x = np.array([[1, 0], [1, 0], [0.9, 0.1], [0, 1]], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dist, idx = nearest_neighbors(x, 2)
    assert (idx != np.arange(4)[:, None]).all()
    assert set(idx[0]) == {1, 2} and set(idx[1]) == {0, 2}
    assert dist[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert (np.diff(dist, axis=1) >= -1e-7).all()


def test_tsp_neighbor_weights_by_hand():
    # sigma = half the distance to the 3rd neighbour = 1.5; P(j) ~ exp(-d^2 / (2 * 1.5^2)).
    dist = np.array([[1.0, 2.0, 3.0, 4.0]])
    w = tsp_neighbor_weights(dist, sigma_rank=3)
    raw = np.exp(-np.array([1, 4, 9, 16]) / 4.5)
    np.testing.assert_allclose(w[0], raw / raw.sum(), rtol=1e-12)
    assert w.sum() == pytest.approx(1.0)


# ---------------------------------------------------------------- TSP loss by hand

def test_tsp_loss_by_hand():
    # 2 anchors, 2 clusters, 2 neighbours each.
    pa = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
    pn = torch.tensor([[[0.8, 0.2], [0.5, 0.5]], [[0.1, 0.9], [0.6, 0.4]]], dtype=torch.float64)
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float64)
    total, cons, ent = tsp_loss(pa, pn, w, entropy_weight=3.0)
    # <pa0, pn0> = .72 + .02 = .74, <pa0, pn1> = .5; <pa1, pn0> = .02 + .72 = .74, <pa1, pn1> = .12 + .32 = .44
    c0 = -(0.75 * math.log(0.74) + 0.25 * math.log(0.5))
    c1 = -(0.5 * math.log(0.74) + 0.5 * math.log(0.44))
    marginal = [0.55, 0.45]
    h = -sum(m * math.log(m) for m in marginal)
    assert cons.item() == pytest.approx((c0 + c1) / 2, rel=1e-12)
    assert ent.item() == pytest.approx(h, rel=1e-12)
    assert total.item() == pytest.approx((c0 + c1) / 2 - 3.0 * h, rel=1e-12)


def test_tsp_loss_prefers_consistent_and_balanced():
    w = torch.ones(2, 1, dtype=torch.float64)
    good = tsp_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
                    torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64), w, 3.0)[0]
    collapsed = tsp_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64),
                         torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]], dtype=torch.float64), w, 3.0)[0]
    assert good.item() == pytest.approx(-3 * math.log(2))
    assert collapsed.item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- TEMI loss by hand

def test_beta_pmi_by_hand():
    ps = torch.tensor([[0.7, 0.3]], dtype=torch.float64)
    pt = torch.tensor([[0.6, 0.4]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    expected = -math.log((0.42 ** 0.6) / 0.5 + (0.12 ** 0.6) / 0.5)
    assert beta_pmi(ps, pt, q, 0.6).item() == pytest.approx(expected, rel=1e-12)
    # beta = 1 and a uniform marginal: pmi = log(k * <ps, pt>).
    assert beta_pmi(ps, pt, q, 1.0).item() == pytest.approx(-math.log(2 * 0.54), rel=1e-12)


def test_temi_loss_by_hand():
    f = dict(dtype=torch.float64)
    # 2 heads, 1 pair, 2 clusters.
    s1 = torch.tensor([[[0.7, 0.3]], [[0.5, 0.5]]], **f)
    s2 = torch.tensor([[[0.6, 0.4]], [[0.1, 0.9]]], **f)
    t1 = torch.tensor([[[0.8, 0.2]], [[0.4, 0.6]]], **f)
    t2 = torch.tensor([[[0.9, 0.1]], [[0.3, 0.7]]], **f)
    q = torch.tensor([[[0.5, 0.5]], [[0.4, 0.6]]], **f)
    beta = 0.8

    def pmi(a, b, m):
        return -math.log(sum((a[c] * b[c]) ** beta / m[c] for c in range(2)))

    w = ((0.8 * 0.9 + 0.2 * 0.1) + (0.4 * 0.3 + 0.6 * 0.7)) / 2  # teacher-ensemble weight
    per_head = [
        w * 0.5 * (pmi([0.7, 0.3], [0.9, 0.1], [0.5, 0.5]) + pmi([0.6, 0.4], [0.8, 0.2], [0.5, 0.5])),
        w * 0.5 * (pmi([0.5, 0.5], [0.3, 0.7], [0.4, 0.6]) + pmi([0.1, 0.9], [0.4, 0.6], [0.4, 0.6])),
    ]
    loss, heads = temi_loss(s1, s2, t1, t2, q, beta)
    np.testing.assert_allclose(heads.numpy(), per_head, rtol=1e-12)
    assert loss.item() == pytest.approx(sum(per_head) / 2, rel=1e-12)


def test_temi_weight_carries_no_gradient():
    t1 = torch.tensor([[[0.8, 0.2]]], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64, requires_grad=True)
    q = torch.full((1, 1, 2), 0.5, dtype=torch.float64)
    loss, _ = temi_loss(s, s, t1.detach(), t1.detach(), q, 1.0)
    loss.backward()
    assert s.grad is not None and t1.grad is None


# ---------------------------------------------------------------- fitting

FAST_TSP = dict(epochs=15, batch_size=64, lr=1e-2, n_neighbors=10)
# A fast-moving teacher and small batches: the poster's schedule needs thousands of steps.
FAST_TEMI = dict(epochs=20, batch_size=32, lr=3e-3, n_heads=3, hidden_dim=32, n_neighbors=10, teacher_momentum=0.9)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_tsp_recovers_blobs_and_is_deterministic():
    x, y = blobs()
    a = fit_head(x, 4, "tsp", seed=3, progress=False, **FAST_TSP)
    b = fit_head(x, 4, "tsp", seed=3, progress=False, **FAST_TSP)
    assert cluster_accuracy(y, a.labels_) == 1.0
    np.testing.assert_array_equal(a.probs_, b.probs_)
    assert a.probs_.shape == (len(x), 4)
    np.testing.assert_allclose(a.probs_.sum(axis=1), 1.0, atol=1e-5)
    assert len(a.history) == 15
    # from random heads the loss has somewhere to go (a K-Means start is already optimal on blobs)
    r = fit_head(x, 4, "tsp", seed=3, progress=False, init="random", **FAST_TSP)
    assert r.history[-1]["loss"] < r.history[0]["loss"] - 0.5 and cluster_accuracy(y, r.labels_) >= 0.95


def test_tsp_kmeans_init_scaling():
    """App. A for the paper's linear layer; the cosine layer starts on the same K-Means directions."""
    x, _ = blobs()
    r = fit_head(x, 4, "tsp", seed=0, progress=False, epochs=0, temperature=None, n_heads=1, kmeans_n_init=10)
    w = r.head.linear.weight.detach().numpy()
    # App. A: each row has norm 1 / sqrt(D).
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1 / math.sqrt(x.shape[1]), rtol=1e-5)
    assert r.head.linear.bias.abs().max().item() == 0.0
    c = fit_head(x, 4, "tsp", seed=0, progress=False, epochs=0, n_heads=1, kmeans_n_init=10).head
    wc = c.weight.detach().numpy()
    np.testing.assert_allclose(wc / np.linalg.norm(wc, axis=1, keepdims=True),
                               w / np.linalg.norm(w, axis=1, keepdims=True), atol=1e-6)
    # logits are cosines over the temperature: bounded by 1 / temperature
    logits = c.logits(torch.as_tensor(x)).detach().numpy()
    assert np.abs(logits).max() <= 1 / c.temperature + 1e-4


def test_tsp_keeps_the_head_of_lowest_loss_on_all_the_data():
    """The heads train side by side; the one kept has the lowest eq. (5) over every point, which is
    recomputed here from the returned head with tsp_loss itself."""
    x, _ = blobs(spread=0.4)
    r = fit_head(x, 4, "tsp", seed=0, progress=False, **{**FAST_TSP, "n_heads": 4})
    info = r.history[-1]
    assert len(info["head_losses"]) == 4 and info["best_head"] == int(np.argmin(info["head_losses"]))
    dist, idx = nearest_neighbors(x / np.linalg.norm(x, axis=1, keepdims=True), FAST_TSP["n_neighbors"])
    w = torch.as_tensor(tsp_neighbor_weights(dist), dtype=torch.float32)
    with torch.no_grad():
        p = r.head(torch.as_tensor(x))
        total, _, _ = tsp_loss(p, p[torch.as_tensor(idx)], w, 3.0)
    assert total.item() == pytest.approx(info["head_losses"][info["best_head"]], abs=1e-4)
    # heads differ (each its own K-Means start), and the kept one is not merely the first
    assert len({round(v, 6) for v in info["head_losses"]}) > 1


def test_temi_deterministic_seed_dependent_and_learns():
    x, y = blobs()
    seen = []
    a = fit_head(x, 4, "temi", seed=1, progress=lambda e, n, info: seen.append((e, n)), **FAST_TEMI)
    b = fit_head(x, 4, "temi", seed=1, progress=False, **FAST_TEMI)
    c = fit_head(x, 4, "temi", seed=2, progress=False, **FAST_TEMI)
    np.testing.assert_array_equal(a.probs_, b.probs_)
    assert not np.array_equal(a.probs_, c.probs_)
    assert seen == [(e, 20) for e in range(1, 21)]
    assert cluster_accuracy(y, a.labels_) >= 0.95
    assert 0 <= a.history[-1]["best_head"] < 3


def test_fit_head_leaves_global_rng_alone():
    x, _ = blobs(n_per=20)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit_head(x, 4, "tsp", seed=0, progress=False, epochs=1)
    assert torch.equal(torch.rand(3), expected)


def test_clustering_head_estimator_api():
    x, y = blobs()
    est = ClusteringHead("tsp", k=4, random_state=0, **FAST_TSP)
    assert est.fit(x) is est
    proba = est.predict_proba(x[:7])
    assert proba.shape == (7, 4)
    np.testing.assert_array_equal(est.predict(x), est.labels_)
    # The head normalises itself: scaling the input changes nothing.
    np.testing.assert_allclose(est.predict_proba(5 * x[:7]), proba, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="kmeans"), "unknown clustering head"),
    (dict(k=1), "k must be"),
    (dict(bogus=1), "unknown tsp hyperparameter"),
    (dict(method="temi", beta=0.5), "beta"),
    (dict(n_neighbors=500), "n_neighbors"),
    (dict(n_heads=0), "n_heads"),
    (dict(temperature=0.0), "temperature"),
])
def test_bad_inputs_raise_input_error(kwargs, match):
    x, _ = blobs(n_per=10)
    kw = {"method": "tsp", "k": 4, **kwargs}
    with pytest.raises(InputError, match=match):
        fit_head(x, kw.pop("k"), kw.pop("method"), progress=False, epochs=1, **kw)


def test_nan_embeddings_rejected():
    x, _ = blobs(n_per=10)
    x[3, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fit_head(x, 4, "tsp", progress=False)


# ---------------------------------------------------------------- ONNX export and append

onnxscript = pytest.importorskip("onnxscript")
from onnxscript import FLOAT, script  # noqa: E402
from onnxscript import opset18 as op  # noqa: E402


@script(onnxscript.values.Opset("itae", 1), default_opset=op)
def ScaledTanh(x: FLOAT) -> FLOAT:
    """A local function in the custom 'itae' domain, like the real encoder's ITAE ops."""
    return op.Mul(op.Tanh(x), op.Constant(value_float=2.0))


def _stand_in_encoder(path, dim=12):
    """pixel_values [B,3,8,8] -> embedding [B,dim] (via a local function in the 'itae' domain),
    artifact_mask [B,8,8] bool. Mimics the real encoder's custom domain and outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    proj = numpy_helper.from_array(rng.normal(size=(3 * 4, dim)).astype(np.float32), "proj")
    nodes = [
        helper.make_node("AveragePool", ["pixel_values"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "proj"], ["pre"]),
        helper.make_node("ScaledTanh", ["pre"], ["embedding"], domain="itae"),
        helper.make_node("ReduceMean", ["pixel_values", "axes1"], ["gray"], keepdims=0),
        helper.make_node("Greater", ["gray", "zero"], ["artifact_mask"]),
    ]
    graph = helper.make_graph(
        nodes, "stand_in_encoder",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim]),
         helper.make_tensor_value_info("artifact_mask", TensorProto.BOOL, ["batch", 8, 8])],
        [proj, numpy_helper.from_array(np.array([1], np.int64), "axes1"),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("itae", 1)],
                              ir_version=10)
    model.functions.append(ScaledTanh.to_function_proto())
    helper.set_model_props(model, {"itae.manifest": '{"schema": 1, "model": "stand-in"}'})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One TSP and one TEMI head, trained briefly on 12-d blobs, exported and appended."""
    from itae_export.cluster.head_export import append_head, export_head

    tmp = tmp_path_factory.mktemp("heads")
    x, _ = blobs(dim=12)
    enc = _stand_in_encoder(tmp / "encoder.onnx")
    out = {}
    for method, hp in (("tsp", FAST_TSP), ("temi", FAST_TEMI)):
        head = fit_head(x, 4, method, seed=0, progress=False, **hp).head
        hpath = export_head(head, 12, tmp / f"{method}_head.onnx", metadata={"itae.head": method}, check=False)
        out[method] = (head, hpath, append_head(enc, hpath, tmp / f"{method}_full.onnx"), enc)
    return out


@pytest.mark.parametrize("method", ["tsp", "temi"])
def test_head_onnx_matches_torch(exported, method):
    import onnxruntime as ort

    from itae_export.cluster.head_export import check_head_onnx

    head, hpath, _, _ = exported[method]
    x, _ = blobs(dim=12, seed=5)
    report = check_head_onnx(head, hpath, x)
    assert report["assignments_equal"] and report["max_abs_err"] <= 1e-5
    sess = ort.InferenceSession(str(hpath), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["cluster_probs", "cluster"]
    # Dynamic batch: one row works too.
    probs, cluster = sess.run(None, {"embedding": x[:1]})
    assert probs.shape == (1, 4) and cluster.dtype == np.int64


@pytest.mark.parametrize("method", ["tsp", "temi"])
def test_append_head_composes_with_custom_domain_encoder(exported, method):
    import onnx
    import onnxruntime as ort

    from itae_export.cluster.head_export import check_composed

    head, _, full, enc = exported[method]
    model = onnx.load(str(full))
    assert [o.name for o in model.graph.output] == ["embedding", "artifact_mask", "cluster_probs", "cluster"]
    assert [f.name for f in model.functions] == ["ScaledTanh"] and model.functions[0].domain == "itae"
    domains = [o.domain for o in model.opset_import]
    assert sorted(domains) == ["", "itae"] and len(set(domains)) == len(domains)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["itae.manifest"] == '{"schema": 1, "model": "stand-in"}' and props["itae.head"] == method
    assert all(i.name.startswith("head/") for i in model.graph.initializer if i.name != "proj"
               and i.name not in ("axes1", "zero"))

    pixels = np.random.default_rng(1).normal(size=(9, 3, 8, 8)).astype(np.float32)
    report = check_composed(full, head, pixels)
    assert report["assignments_equal"] and report["max_abs_err"] <= 1e-5
    # The encoder's own outputs pass through the merge unchanged.
    ref = ort.InferenceSession(str(enc), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels})
    got = ort.InferenceSession(str(full), providers=["CPUExecutionProvider"]).run(
        ["embedding", "artifact_mask"], {"pixel_values": pixels})
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


def test_append_head_refuses_encoder_without_embedding_and_double_append(exported, tmp_path):
    import onnx

    from itae_export.cluster.head_export import append_head

    _, hpath, full, enc = exported["tsp"]
    with pytest.raises(InputError, match="already has output"):
        append_head(full, hpath, tmp_path / "twice.onnx")
    model = onnx.load(str(enc))
    model.graph.output[0].name = "features"
    model.graph.node[3].output[0] = "features"
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(InputError, match="no output named 'embedding'"):
        append_head(tmp_path / "bad.onnx", hpath, tmp_path / "out.onnx")


def test_check_composed_catches_a_different_head(exported):
    from itae_export.cluster.head_export import check_composed

    _, _, full, _ = exported["tsp"]
    other = exported["temi"][0]
    pixels = np.random.default_rng(2).normal(size=(16, 3, 8, 8)).astype(np.float32)
    with pytest.raises(ToleranceError):
        check_composed(full, other, pixels)
