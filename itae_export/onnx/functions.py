"""The ``itae`` ONNX domain: ArtifactMask and AttenuateLogits, as onnxscript functions.

The exporter writes one node per op and stores the function bodies below in the model's
``functions``, so any ONNX Runtime runs it with nothing to register. The contract for other
runtimes is docs/onnx-ops.md; the PyTorch twins are in itae_export/ops.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset18 as op

from itae_export.onnx.contract import ITAE_DOMAIN, ITAE_DOMAIN_VERSION, ONNX_OPSET
from itae_export.registry import GROUP_CODES, STRATEGY_CODES

itae = onnxscript.values.Opset(ITAE_DOMAIN, ITAE_DOMAIN_VERSION)

# the integer attributes, from the one table in the registry (shared with the PyTorch ops)
_GROUP_MINORITY, _GROUP_BELOW, _GROUP_ABOVE = (GROUP_CODES[g] for g in ("minority", "below", "above"))
_STRATEGY_MIN, _STRATEGY_NEG_INF = STRATEGY_CODES["min"], STRATEGY_CODES["neg-inf"]
_NEG_INF = np.array(-np.inf, dtype=np.float32)
_INT64_MAX = np.array([np.iinfo(np.int64).max], dtype=np.int64)


@onnxscript.script(itae, default_opset=op)
def ArtifactMask(X, theta: float, scale: float, group: int):
    """mask[b,t-1] for non-CLS token t from norm = ||X[b,t,:] * scale||_2 (float32) vs theta.

    PyTorch: ``itae_export.model.ops.artifact_mask``. group 0 = minority of (<= theta, > theta),
    ties to <= theta, no artifacts if a side is empty; 1 = below (<= theta); 2 = above.
    """
    axis1 = op.Constant(value_ints=[1])
    cand = op.Slice(op.Cast(X, to=1), axis1, _INT64_MAX, axis1)
    scaled = op.Mul(cand, op.Constant(value_float=scale))
    norms = op.Sqrt(op.ReduceSum(op.Mul(scaled, scaled), op.Constant(value_ints=[-1]), keepdims=0))
    below = op.LessOrEqual(norms, op.Constant(value_float=theta))
    above = op.Not(below)
    n_below = op.ReduceSum(op.Cast(below, to=7), axis1, keepdims=1)
    n_above = op.ReduceSum(op.Cast(above, to=7), axis1, keepdims=1)
    zero = op.Constant(value_int=0)
    both_sides = op.And(op.Greater(n_below, zero), op.Greater(n_above, zero))
    # boolean selects are written with And/Or: ONNX Runtime's CPU Where has no bool kernel
    pick_below = op.LessOrEqual(n_below, n_above)
    minority = op.And(op.Or(op.And(pick_below, below), op.And(op.Not(pick_below), above)), both_sides)
    g = op.Constant(value_int=group)
    is_minority = op.Equal(g, op.Constant(value_int=_GROUP_MINORITY))
    is_below = op.Equal(g, op.Constant(value_int=_GROUP_BELOW))
    is_above = op.Equal(g, op.Constant(value_int=_GROUP_ABOVE))
    mask = op.Or(op.And(is_minority, minority), op.Or(op.And(is_below, below), op.And(is_above, above)))
    return mask, norms


@onnxscript.script(itae, default_opset=op)
def AttenuateLogits(S, M, strategy: int, all_rows: int, lsa: int):
    """S'[b,h,i,k] for edited rows i and artifact columns k (M[b,k-1] true); other entries kept.

    PyTorch: ``itae_export.model.ops.attenuate_logits``. Rows: 0 only, or all when all_rows=1.
    lsa=1 sets the edited rows' diagonal to -inf first. strategy 0 = min over columns 1..T-1,
    1 = -inf, 2 = mean over columns 1..T-1.
    """
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    shape = op.Shape(S)
    n_rows = op.Gather(shape, op.Constant(value_int=2))
    n_cols = op.Gather(shape, op.Constant(value_int=3))
    rows_Q1 = op.Unsqueeze(op.Range(zero, n_rows, one), op.Constant(value_ints=[1]))
    cols_1T = op.Unsqueeze(op.Range(zero, n_cols, one), op.Constant(value_ints=[0]))
    edit_rows_Q1 = op.Or(op.Equal(rows_Q1, zero), op.Cast(op.Constant(value_int=all_rows), to=9))
    neg_inf = op.CastLike(_NEG_INF, S)
    lsa_QT = op.And(op.And(op.Equal(rows_Q1, cols_1T), edit_rows_Q1), op.Cast(op.Constant(value_int=lsa), to=9))
    S1 = op.Where(lsa_QT, neg_inf, S)
    axis3 = op.Constant(value_ints=[3])
    cand = op.Slice(S1, op.Constant(value_ints=[1]), _INT64_MAX, axis3)
    sub_min = op.ReduceMin(cand, axis3, keepdims=1)
    sub_mean = op.ReduceMean(cand, axis3, keepdims=1)
    st = op.Constant(value_int=strategy)
    is_min = op.Equal(st, op.Constant(value_int=_STRATEGY_MIN))
    is_neg_inf = op.Equal(st, op.Constant(value_int=_STRATEGY_NEG_INF))
    sub = op.Where(is_min, sub_min, op.Where(is_neg_inf, neg_inf, sub_mean))
    first_B1 = op.Slice(M, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]), op.Constant(value_ints=[1]))
    cols_BT = op.Concat(op.And(first_B1, op.Not(first_B1)), M, axis=1)  # column 0 (CLS) never edited
    edit_B1QT = op.And(op.Unsqueeze(cols_BT, op.Constant(value_ints=[1, 2])), edit_rows_Q1)
    Y = op.Where(edit_B1QT, sub, S1)
    return Y


FUNCTIONS = (ArtifactMask, AttenuateLogits)


def _schema(name: str, inputs, outputs, attributes) -> OpSchema:
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return OpSchema(
        name, ITAE_DOMAIN, ITAE_DOMAIN_VERSION,
        inputs=[OpSchema.FormalParameter(n, t) for n, t in inputs],
        outputs=[OpSchema.FormalParameter(n, t) for n, t in outputs],
        type_constraints=[("T", floats, "")],
        attributes=[OpSchema.Attribute(n, t, "") for n, t in attributes],
    )


_A = OpSchema.AttrType
_ARTIFACT_MASK = onnxscript.values.Op(itae, "ArtifactMask", _schema(
    "ArtifactMask", [("X", "T")], [("mask", "tensor(bool)"), ("norms", "tensor(float)")],
    [("theta", _A.FLOAT), ("scale", _A.FLOAT), ("group", _A.INT)]))
_ATTENUATE = onnxscript.values.Op(itae, "AttenuateLogits", _schema(
    "AttenuateLogits", [("S", "T"), ("M", "tensor(bool)")], [("Y", "T")],
    [("strategy", _A.INT), ("all_rows", _A.INT), ("lsa", _A.INT)]))


def _translate_artifact_mask(x, theta: float, scale: float, group: int):
    return _ARTIFACT_MASK(x, theta=theta, scale=scale, group=group)


def _translate_attenuate(s, mask, strategy: int, all_rows: bool, lsa: bool):
    return _ATTENUATE(s, mask, strategy=strategy, all_rows=int(all_rows), lsa=int(lsa))


def translation_table() -> dict:
    """torch custom op -> a translation that emits one node of the ``itae`` domain."""
    import torch


    return {
        torch.ops.itae.artifact_mask.default: _translate_artifact_mask,
        torch.ops.itae.attenuate_logits.default: _translate_attenuate,
    }


def function_protos() -> list[onnx.FunctionProto]:
    protos = []
    for fn in FUNCTIONS:
        proto = fn.to_function_proto()
        proto.doc_string = (fn.function.__doc__ or "").strip()
        del proto.opset_import[:]
        proto.opset_import.extend([onnx.helper.make_opsetid("", ONNX_OPSET)])
        protos.append(proto)
    return protos


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store the bodies of the ``itae`` ops used in ``model`` as local functions (in place)."""
    used = {n.op_type for n in model.graph.node if n.domain == ITAE_DOMAIN}
    have = {(f.domain, f.name) for f in model.functions}
    for proto in function_protos():
        if proto.name in used and (proto.domain, proto.name) not in have:
            model.functions.append(proto)
    if used and not any(o.domain == ITAE_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(ITAE_DOMAIN, ITAE_DOMAIN_VERSION))
    return model
