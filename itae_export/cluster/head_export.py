"""Export a trained clustering head to ONNX and append it after an exported encoder.

Head graph: ``embedding`` [B, D] -> ``cluster_probs`` [B, k] (float32), ``cluster`` [B] (int64).
:func:`append_head` composes ``encoder.onnx`` (output ``embedding``) with the head graph, so one
model maps ``pixel_values`` to the encoder's outputs plus ``cluster_probs`` and ``cluster``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from itae_export.errors import InputError, ToleranceError
from itae_export.files import atomic_write_bytes
from itae_export.onnx.contract import OUTPUT_EMBEDDING
from itae_export.onnx.manifest import reseal
from itae_export.runtime import ort_session

OUTPUT_PROBS = "cluster_probs"
OUTPUT_CLUSTER = "cluster"
HEAD_PREFIX = "head/"
HEAD_OPSET = 18  # the encoder's main-graph opset (itae_export.onnx.ONNX_OPSET); merging needs equal opsets
PROBS_ATOL = 1e-5


def _wrapper(head):
    import torch

    class HeadWithArgmax(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, embedding):
            probs = self.head(embedding)
            return probs, torch.argmax(probs, dim=-1)

    return HeadWithArgmax(head).eval()


def export_head(head, dim: int, out_path: str | os.PathLike, *, opset: int = HEAD_OPSET,
                metadata: dict[str, str] | None = None, check: bool = True) -> Path:
    """Export ``head`` (embedding [B, dim] -> probabilities [B, k]) with torch.onnx.export(dynamo=True).

    Writes atomically; with ``check`` the ORT output is compared with PyTorch on random inputs.
    """
    import onnx
    import torch

    head = head.cpu().eval()
    example = torch.randn(4, dim, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    prog = torch.onnx.export(_wrapper(head), (example,), dynamo=True, opset_version=opset,
                             input_names=[OUTPUT_EMBEDDING], output_names=[OUTPUT_PROBS, OUTPUT_CLUSTER],
                             dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    model = prog.model_proto
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(model)
    out_path = Path(out_path)
    atomic_write_bytes(out_path, model.SerializeToString())
    if check:
        x = torch.randn(37, dim, generator=torch.Generator().manual_seed(1)).numpy()
        check_head_onnx(head, out_path, x)
    return out_path


def check_head_onnx(head, onnx_path, embeddings: np.ndarray, atol: float = PROBS_ATOL) -> dict:
    """Run the head graph in ORT; raise ToleranceError unless assignments match and probs within atol."""
    import torch

    x = np.asarray(embeddings, dtype=np.float32)
    with torch.no_grad():
        ref = head.cpu().eval()(torch.as_tensor(x)).numpy()
    probs, cluster = ort_session(onnx_path).run([OUTPUT_PROBS, OUTPUT_CLUSTER], {OUTPUT_EMBEDDING: x})
    return _compare(ref, probs, cluster, atol)


def _compare(ref_probs, probs, cluster, atol) -> dict:
    err = float(np.abs(ref_probs - probs).max())
    same = bool(np.array_equal(ref_probs.argmax(axis=1), cluster))
    report = {"max_abs_err": err, "assignments_equal": same, "dtype": str(cluster.dtype)}
    if cluster.dtype != np.int64 or not same or err > atol:
        raise ToleranceError(f"ONNX head disagrees with PyTorch: max |dprobs| {err:.2e} (atol {atol:.0e}), "
                             f"assignments equal: {same}, cluster dtype {cluster.dtype}", report)
    return report


def compose_head(encoder, head, *, prefix: str = HEAD_PREFIX):
    """Merge two ModelProtos: the encoder's ``embedding`` feeds the head's ``embedding``.

    Keeps every encoder output (``embedding`` included) and adds ``cluster_probs``, ``cluster``.
    The head's internal names are prefixed; functions and all opset domains are kept.
    """
    import onnx
    from onnx import compose

    enc_out = [o.name for o in encoder.graph.output]
    if OUTPUT_EMBEDDING not in enc_out:
        raise InputError(f"the encoder has no output named {OUTPUT_EMBEDDING!r} (outputs: {enc_out})")
    if [i.name for i in head.graph.input] != [OUTPUT_EMBEDDING]:
        raise InputError(f"the head graph must have the single input {OUTPUT_EMBEDDING!r}")
    head_out = [o.name for o in head.graph.output]
    clash = set(head_out) & set(enc_out)
    if clash:
        raise InputError(f"the encoder already has output(s) {sorted(clash)}; is a head appended already?")

    enc_ops = {o.domain or "": o.version for o in encoder.opset_import}
    head = compose.add_prefix(head, prefix, rename_inputs=False, rename_outputs=False)
    head_ops = {o.domain or "": o.version for o in head.opset_import}
    if head_ops.get("", enc_ops.get("")) != enc_ops.get("", head_ops.get("")):
        head = onnx.version_converter.convert_version(head, enc_ops[""])
    ir = max(encoder.ir_version, head.ir_version)
    encoder = _copy(encoder)
    encoder.ir_version = ir
    head.ir_version = ir
    merged = compose.merge_models(encoder, head, io_map=[(OUTPUT_EMBEDDING, OUTPUT_EMBEDDING)],
                                  outputs=enc_out + head_out, name=encoder.graph.name or "itae_with_head")
    # merge_models concatenates both opset lists; keep one entry per domain.
    seen: dict[str, int] = {}
    for o in merged.opset_import:
        seen.setdefault(o.domain, o.version)
    del merged.opset_import[:]
    merged.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in seen.items())
    # metadata_props: merge_models already unions both; make sure the encoder's survive verbatim.
    props = {p.key: p.value for p in merged.metadata_props}
    props.update({p.key: p.value for p in encoder.metadata_props})
    onnx.helper.set_model_props(merged, props)
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(merged, attr, getattr(encoder, attr))
    reseal(merged)  # a new graph: the encoder's integrity digest is recomputed over it
    onnx.checker.check_model(merged)
    return merged


def _copy(model):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def append_head(encoder_onnx_path, head_onnx_path, out_path) -> Path:
    """Write encoder + head as one ONNX model at ``out_path`` (atomic); :func:`check_composed`
    compares it with the PyTorch head."""
    import onnx

    encoder = onnx.load(str(encoder_onnx_path))
    head = onnx.load(str(head_onnx_path))
    merged = compose_head(encoder, head)
    out_path = Path(out_path)
    data = merged.SerializeToString()
    atomic_write_bytes(out_path, data)
    return out_path


def check_composed(onnx_path, head_module, inputs: dict | np.ndarray, atol: float = PROBS_ATOL) -> dict:
    """Run the composed model; compare its head outputs with ``head_module(embedding)``."""
    import torch

    sess = ort_session(onnx_path)
    if not isinstance(inputs, dict):
        inputs = {sess.get_inputs()[0].name: np.asarray(inputs, dtype=np.float32)}
    emb, probs, cluster = sess.run([OUTPUT_EMBEDDING, OUTPUT_PROBS, OUTPUT_CLUSTER], inputs)
    with torch.no_grad():
        ref = head_module.cpu().eval()(torch.as_tensor(emb)).numpy()
    return _compare(ref, probs, cluster, atol)
