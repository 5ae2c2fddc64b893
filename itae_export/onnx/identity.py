"""The identity of an exported model: what it computes, independent of when it was exported.

It lives with the manifest (both describe one graph); the embedding store keys its rows by it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from itae_export.errors import InputError
from itae_export.onnx.contract import EXTERNAL_DATA_SUFFIX, METADATA_KEY


def model_fingerprint(onnx_path: str | os.PathLike, cache=None) -> str:
    """The identity of what a model computes: sha256 over its graph (without the metadata, which
    holds the export's time) and external data, and the preprocessing of its embedded manifest.

    Re-exporting the same model gives the same fingerprint, so stored embeddings stay valid; a
    change of weights, options or preprocessing gives another. Hashing a multi-GB model takes
    seconds, so with ``cache`` (anything with get_meta/set_meta, e.g. the embedding store) the digest is remembered against the files' (path, size, mtime_ns).
    """
    import onnx

    onnx_path = Path(onnx_path).resolve()
    parts = [onnx_path]
    for suffix in (".onnx" + EXTERNAL_DATA_SUFFIX, ".onnx_data", EXTERNAL_DATA_SUFFIX):
        p = onnx_path.with_name(onnx_path.stem + suffix)
        if p.is_file() and p != onnx_path:
            parts.append(p)
    stamp = "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in parts)
    if cache is not None:
        hit = cache.get_meta("fingerprint:" + stamp)
        if hit:
            return hit
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own types
        raise InputError(f"{onnx_path}: not a readable ONNX model ({type(e).__name__})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    del proto.metadata_props[:]
    h = hashlib.sha256(proto.SerializeToString(deterministic=True))
    prep = json.loads(meta[METADATA_KEY]).get("preprocessing") if METADATA_KEY in meta else None
    h.update(json.dumps(prep, sort_keys=True).encode())
    for p in parts[1:]:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    digest = "sha256:" + h.hexdigest()
    if cache is not None:
        cache.set_meta("fingerprint:" + stamp, digest)
    return digest
