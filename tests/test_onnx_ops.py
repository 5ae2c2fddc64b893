"""The itae ONNX functions against their PyTorch twins, op by op, for every attribute value, and
the hand-written examples of tests/hand_cases.py (ties, norms equal to theta) in ONNX Runtime."""

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hand_cases import HAND_CLS_ROWS, HAND_EXPECTED, HAND_MASK, HAND_NORMS, hand_logits
from onnx import TensorProto, helper

import itae_export.model.ops  # noqa: F401
from itae_export.onnx.contract import ITAE_DOMAIN, ONNX_OPSET
from itae_export.onnx.functions import function_protos
from itae_export.registry import GROUPS, STRATEGIES


def _single_op_model(op_type, inputs, outputs, **attrs):
    node = helper.make_node(op_type, [n for n, _, _ in inputs], [n for n, _, _ in outputs], domain=ITAE_DOMAIN, **attrs)
    graph = helper.make_graph(
        [node], "probe",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(ITAE_DOMAIN, 1)],
                              functions=function_protos())
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("group", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_artifact_mask_matches_torch(group, dtype):
    rng = np.random.default_rng(group)
    x = rng.standard_normal((5, 9, 16)).astype(dtype)
    x[0, 3] *= 4  # one clear outlier; image 1 all equal-ish; image 4 split in half
    x[4, 1:5] *= 5
    etype = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    sess = _single_op_model("ArtifactMask", [("X", etype, [None, None, 16])],
                            [("mask", TensorProto.BOOL, [None, None]), ("norms", TensorProto.FLOAT, [None, None])],
                            theta=1.1, scale=0.25, group=group)
    mask, norms = sess.run(None, {"X": x})
    ref_mask, ref_norms = torch.ops.itae.artifact_mask(torch.from_numpy(x), 1.1, 0.25, group)
    assert norms.dtype == np.float32
    np.testing.assert_allclose(norms, ref_norms.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(mask, ref_mask.numpy())
    assert mask.any() and not mask.all()


@pytest.mark.parametrize("strategy,all_rows,lsa", list(itertools.product([0, 1, 2], [0, 1], [0, 1])))
def test_attenuate_logits_matches_torch(strategy, all_rows, lsa):
    rng = np.random.default_rng(10 * strategy + 2 * all_rows + lsa)
    B, H, T = 3, 2, 7
    s = rng.standard_normal((B, H, T, T)).astype(np.float32)
    m = rng.random((B, T - 1)) < 0.4
    m[1] = False  # an image without artifacts stays untouched
    sess = _single_op_model("AttenuateLogits", [("S", TensorProto.FLOAT, [None, None, None, None]), ("M", TensorProto.BOOL, [None, None])],
                            [("Y", TensorProto.FLOAT, [None, None, None, None])], strategy=strategy, all_rows=all_rows, lsa=lsa)
    (y,) = sess.run(None, {"S": s, "M": m})
    ref = torch.ops.itae.attenuate_logits(torch.from_numpy(s), torch.from_numpy(m), strategy, bool(all_rows), bool(lsa)).numpy()
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6)
    if not lsa:
        np.testing.assert_array_equal(y[1], s[1])
    assert (y != s).any()


def _mask_session(etype, theta, scale, group):
    return _single_op_model("ArtifactMask", [("X", etype, [None, None, None])],
                            [("mask", TensorProto.BOOL, [None, None]), ("norms", TensorProto.FLOAT, [None, None])],
                            theta=float(theta), scale=float(scale), group=group)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("group", GROUPS)
def test_artifact_mask_hand_examples_in_onnx(group, dtype):
    """The hand table through ONNX Runtime: a 2 vs 2 tie goes to La, a norm equal to theta is in La,
    an empty side means no artifacts."""
    x = np.zeros((len(HAND_NORMS), len(HAND_NORMS[0]), 3), dtype)
    x[..., 0] = HAND_NORMS  # every value is exact in float16 too
    etype = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    mask, norms = _mask_session(etype, 3.0, 1.0, GROUPS.index(group)).run(None, {"X": x})
    np.testing.assert_array_equal(norms, np.array([row[1:] for row in HAND_NORMS], np.float32))
    assert mask.tolist() == HAND_EXPECTED[group], f"group={group}: {mask.tolist()}"


def test_artifact_mask_norm_equal_to_theta_is_below_in_onnx():
    # ||[3, 4, 0, 12]|| * 0.5 = 6.5 exactly; with theta 6.5 the token is in La (<= theta)
    x = np.array([[[100.0, 0, 0, 0], [3.0, 4.0, 0.0, 12.0], [0.0, 0.0, 0.0, 1.0]]], np.float32)
    below = GROUPS.index("below")
    for theta, expected in ((6.5, [[True, True]]), (6.0, [[False, True]])):
        mask, norms = _mask_session(TensorProto.FLOAT, theta, 0.5, below).run(None, {"X": x})
        assert norms.tolist() == [[6.5, 0.5]]
        assert mask.tolist() == expected, f"theta={theta}: {mask.tolist()}"


def test_artifact_mask_256_patches_split_128_128_in_onnx():
    """A ViT-S/14 at 224 has 256 patches; a 128/128 split is a tie and goes to La (<= theta), in
    ONNX Runtime as in PyTorch. Image 1 puts its 128 La tokens exactly on theta."""
    rng = np.random.default_rng(0)
    n = np.empty((2, 257), np.float32)
    n[:, 0] = 100.0  # the CLS token is no candidate
    for b, low in enumerate((1.0, 3.0)):
        perm = rng.permutation(256)
        n[b, 1 + perm[:128]] = low
        n[b, 1 + perm[128:]] = 5.0
    x = np.zeros((2, 257, 2), np.float32)
    x[..., 0] = n
    mask, _ = _mask_session(TensorProto.FLOAT, 3.0, 1.0, GROUPS.index("minority")).run(None, {"X": x})
    expected = n[:, 1:] <= 3.0
    assert expected.sum(1).tolist() == [128, 128]
    np.testing.assert_array_equal(mask, expected)
    ref, _ = torch.ops.itae.artifact_mask(torch.from_numpy(x), 3.0, 1.0, GROUPS.index("minority"))
    np.testing.assert_array_equal(ref.numpy(), expected)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_attenuate_hand_cls_rows_in_onnx(strategy):
    s = hand_logits().numpy()
    sess = _single_op_model("AttenuateLogits", [("S", TensorProto.FLOAT, [None, None, None, None]), ("M", TensorProto.BOOL, [None, None])],
                            [("Y", TensorProto.FLOAT, [None, None, None, None])],
                            strategy=STRATEGIES.index(strategy), all_rows=0, lsa=0)
    (y,) = sess.run(None, {"S": s, "M": HAND_MASK.numpy()})
    for (b, h), row in HAND_CLS_ROWS[strategy].items():
        assert y[b, h, 0].tolist() == row, f"{strategy} b={b} h={h}: {y[b, h, 0].tolist()}"
    np.testing.assert_array_equal(y[:, :, 1:], s[:, :, 1:])
