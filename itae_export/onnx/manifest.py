"""The exported model's contract: graph names, and the sidecar manifest beside every .onnx file.

The same manifest dictionary is stored, as JSON, in the model's ``metadata_props`` under the
key ``itae.manifest``. Readers (itae-cluster, non-Python users) take the preprocessing from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from itae_export.errors import InputError
from itae_export.files import atomic_write_json
from itae_export.onnx.contract import MANIFEST_SUFFIX, METADATA_KEY


def manifest_path(onnx_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.json``."""
    p = Path(onnx_path)
    return p.with_suffix(MANIFEST_SUFFIX)


def write_manifest(onnx_path: str | os.PathLike, manifest: dict) -> Path:
    path = manifest_path(onnx_path)
    atomic_write_json(path, manifest)
    return path


def read_manifest(onnx_path: str | os.PathLike) -> dict:
    """The manifest of an exported model: the sidecar JSON, else the graph's metadata_props."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: no such ONNX file")
    side = manifest_path(onnx_path)
    if side.is_file():
        try:
            return json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{side}: the manifest is not valid JSON ({e})") from e
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise InputError(f"{onnx_path}: not an itae-export model (no {side.name} and no '{METADATA_KEY}' metadata)")
