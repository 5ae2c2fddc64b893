"""The itae ONNX functions against their PyTorch twins, op by op, for every attribute value."""

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import itae_export.model.ops  # noqa: F401
from itae_export.onnx.contract import ITAE_DOMAIN, ONNX_OPSET
from itae_export.onnx.functions import function_protos


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
