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
    """The manifest of an exported model. The copy inside the graph (``metadata_props``) is the
    authority; a sidecar ``<stem>.json`` that disagrees with it is an InputError naming the field."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: no such ONNX file")
    embedded = embedded_manifest(onnx_path)
    side = manifest_path(onnx_path)
    if embedded is None:
        raise InputError(f"{onnx_path}: not an itae-export model (the graph carries no '{METADATA_KEY}' metadata)")
    if side.is_file():
        try:
            sidecar = json.loads(side.read_text())
        except (ValueError, OSError) as e:
            raise InputError(f"{side}: the manifest is not valid JSON ({e})") from None
        field = first_difference(embedded, sidecar)
        if field is not None:
            raise InputError(f"{side}: field '{field}' differs from the manifest inside {onnx_path.name}, which is "
                             f"the authority; delete {side.name} or restore it from the graph")
    return embedded


def embedded_manifest(onnx_path: str | os.PathLike) -> dict | None:
    """The manifest stored in the graph's metadata, or None; an unreadable file is an InputError."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise InputError(f"{onnx_path}: not a readable ONNX model (truncated or not ONNX: {type(e).__name__})") from None
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return json.loads(prop.value)
            except ValueError as e:
                raise InputError(f"{onnx_path}: the manifest inside the graph is not valid JSON ({e})") from None
    return None


def first_difference(a, b, prefix: str = "") -> str | None:
    """The dotted name of the first field where two JSON values differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return prefix + str(k)
            d = first_difference(a[k], b[k], f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{prefix}{i}.")
            if d is not None:
                return d
        return None
    return None if a == b else prefix.rstrip(".") or "(the whole manifest)"
