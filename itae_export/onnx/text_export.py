"""CLIP's text tower to ONNX, with its tokenizer files beside it, validated against PyTorch.

The export folder holds ``text.onnx`` (input ``input_ids`` int64 [batch, 77], output
``text_embedding`` float32 [batch, E]), ``vocab.json`` and ``merges.txt`` (docs/search.md,
"Tokenizer") and ``text.json`` (the manifest, written last). The manifest records the checkpoint's
sha256: a text query meets only images embedded by a graph exported from the same file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from itae_export import __version__
from itae_export.errors import ToleranceError
from itae_export.files import atomic_write_bytes, atomic_write_json
from itae_export.model.text import build_text_model, convert_text_state_dict
from itae_export.onnx.contract import (
    FP32_REL_TOL,
    MAX_BATCH,
    ONNX_OPSET,
    TEXT_CONTEXT_LENGTH,
    TEXT_INPUT_NAME,
    TEXT_MANIFEST_NAME,
    TEXT_ONNX_NAME,
    TEXT_OUTPUT_EMBEDDING,
)
from itae_export.registry import get_text_arch, resolve_name
from itae_export.runtime import ort_session
from itae_export.search.tokenizer import ClipTokenizer, write_tokenizer_files
from itae_export.weights.checkpoints import read_checkpoint, sha256_file

# texts every validation tokenises and runs (with random id rows): short, empty, long, unicode
VALIDATION_TEXTS = ("a photo of a red dress", "", "Ünïcödé — 東京 🚀 emoji 👍🏽", "word " * 100, "a", "it's 3.14!")


def load_text_tower(model_name: str, weights: str | os.PathLike):
    """(text model, weights info) from a whole CLIP checkpoint, loaded strictly."""
    arch = get_text_arch(model_name)
    raw, _ = read_checkpoint(weights)
    sd, fmt = convert_text_state_dict(raw, str(weights))
    model = build_text_model(arch, sd, str(weights))
    return model, {"source": str(weights), "format": fmt, "sha256": sha256_file(weights)}


def _export(model, path: Path) -> bytes:
    import onnx_ir
    import torch

    example = torch.randint(1, 49406, (2, TEXT_CONTEXT_LENGTH))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=ONNX_OPSET,
                                        input_names=[TEXT_INPUT_NAME], output_names=[TEXT_OUTPUT_EMBEDDING],
                                        dynamic_shapes=({0: batch},), verbose=False)
    finally:
        quiet.setLevel(level)
    tmp = path.with_name(f".{path.name}.export.tmp")
    onnx_ir.save(program.model, str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def validate_text_graph(onnx_bytes: bytes, model, tokenizer: ClipTokenizer, seed: int = 0) -> dict:
    """max |onnx - torch| / max |torch| over the validation texts and random id rows (batch 1 and n)."""
    import torch

    rng = np.random.default_rng(seed)
    ids = np.concatenate([tokenizer(list(VALIDATION_TEXTS)), rng.integers(1, 49407, (3, TEXT_CONTEXT_LENGTH))])
    ids[-3:, -1] = 49407  # EOT last in the random rows
    sess = ort_session(onnx_bytes)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
    (got,) = sess.run([TEXT_OUTPUT_EMBEDDING], {TEXT_INPUT_NAME: ids})
    (one,) = sess.run([TEXT_OUTPUT_EMBEDDING], {TEXT_INPUT_NAME: ids[:1]})
    err = float(max(np.abs(got - ref).max(), np.abs(one - ref[:1]).max()) / np.abs(ref).max())
    return {"max_rel_err": err, "tolerance": FP32_REL_TOL, "n": int(len(ids)), "passed": bool(err <= FP32_REL_TOL)}


def export_text_tower(model_name: str, weights: str | os.PathLike | None, out_dir: str | os.PathLike, *,
                      model=None, weights_info: dict | None = None) -> dict:
    """Export, validate and publish the text tower of ``model_name`` into ``out_dir``.

    ``model``: an already built text tower (tests); otherwise it is loaded from ``weights``.
    Nothing but the tokenizer files is left behind when validation fails."""
    name = resolve_name(model_name)
    arch = get_text_arch(name)
    if model is None:
        model, weights_info = load_text_tower(name, weights)
    weights_info = weights_info or {"source": "in-memory model", "format": "torch", "sha256": None}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(out_dir)
    tokenizer = ClipTokenizer(out_dir)
    data = _export(model.float().eval(), out_dir / TEXT_ONNX_NAME)
    validation = validate_text_graph(data, model, tokenizer)
    if not validation["passed"]:
        raise ToleranceError(f"{name} text tower: ONNX differs from PyTorch by {validation['max_rel_err']:.3g} "
                             f"(> {FP32_REL_TOL}); nothing published", validation)
    atomic_write_bytes(out_dir / TEXT_ONNX_NAME, data)
    manifest = {
        "schema": 1, "kind": "clip-text", "model": name, "arch": dataclasses.asdict(arch),
        "embed_dim": arch.embed_dim, "context_length": arch.context_length,
        "inputs": [{"name": TEXT_INPUT_NAME, "dtype": "int64", "shape": ["batch", arch.context_length]}],
        "outputs": [{"name": TEXT_OUTPUT_EMBEDDING, "dtype": "float32", "shape": ["batch", arch.embed_dim]}],
        "tokenizer": {"vocab": "vocab.json", "merges": "merges.txt", "rules": "docs/search.md#tokenizer",
                      "sot": tokenizer.sot, "eot": tokenizer.eot, "pad": 0, "clean": "lower"},
        "weights": weights_info, "opset": ONNX_OPSET, "validation": validation,
        "package": "itae-export", "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(out_dir / TEXT_MANIFEST_NAME, manifest)  # last: marks a complete export
    return {"onnx": str(out_dir / TEXT_ONNX_NAME), "manifest": manifest, "validation": validation}
