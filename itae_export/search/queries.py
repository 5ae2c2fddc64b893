"""Turning a query into a unit vector of the index's model: an image file (embedded with the same
exported graph), an image of the collection ("more like this"), or a text (the CLIP text tower)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from itae_export.onnx.identity import model_fingerprint
from itae_export.errors import InputError
from itae_export.data.embed import load_item
from itae_export.data.sources import Item, text_key
from itae_export.images import DEFAULT_MAX_PIXELS, PreprocessSpec
from itae_export.onnx.manifest import read_manifest
from itae_export.runtime import Embedder, open_session
from itae_export.search.index import SearchIndex
from itae_export.search.session import Session, new_session, read_feedback
from itae_export.search.text import TextEncoder


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32).reshape(-1)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def collection_onnx(index: SearchIndex) -> Path | None:
    onnx = index.info.get("onnx")
    return Path(onnx) if onnx else None


def embed_image(index: SearchIndex, image: str | os.PathLike, onnx_path: str | os.PathLike, device: str = "auto",
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The unit embedding of one image file, by ``onnx_path``, which must be the index's model."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InputError(f"--onnx: {onnx_path}: no such file")
    index.check_model(model_fingerprint(onnx_path), f"--onnx {onnx_path}")
    pre = PreprocessSpec.from_manifest(read_manifest(onnx_path)["preprocessing"])
    image = os.fspath(image)
    if not os.path.isfile(image):
        what = "not a regular file (a folder, device or pipe)" if os.path.exists(image) else "no such file"
        raise InputError(f"--image: {text_key(image)}: {what}")
    pixels, reason, _ = load_item(Item(0, image, image), pre, max_pixels)  # the decode of every command
    if pixels is None:
        raise InputError(f"--image: {text_key(image)}: {reason}")
    sess, provider = open_session(onnx_path, device, spinning=False)
    return _unit(Embedder(sess, provider)(pixels[None])[0])


def query_vector(index: SearchIndex, *, image=None, like: str | None = None, text: str | None = None,
                 onnx=None, text_model=None, device: str = "auto",
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[dict, np.ndarray]:
    """({"kind", "value"}, unit vector) of exactly one of ``image``, ``like`` or ``text``; ``max_pixels``:
    the largest ``image`` decoded (``--max-pixels``, as in itae-cluster)."""
    given = [name for name, v in (("--image", image), ("--like", like), ("--text", text)) if v is not None]
    if len(given) != 1:
        raise InputError("give exactly one query: --image FILE, --like PATH (an image of the collection) or --text TEXT"
                         + (f" (got {', '.join(given)})" if given else ""))
    if like is not None:
        return {"kind": "like", "value": like}, index.vectors[index.row(like)].copy()
    if image is not None:
        onnx = onnx or collection_onnx(index)
        if onnx is None:
            raise InputError("--image needs --onnx (the model the collection was embedded with)")
        return ({"kind": "image", "value": text_key(str(Path(image).resolve()))},
                embed_image(index, image, onnx, device, max_pixels))
    if text_model is None:
        raise InputError("--text needs --text-model DIR (a text tower exported with itae-search export-text)")
    encoder = TextEncoder(text_model, device=device)
    encoder.check_index(index)
    return {"kind": "text", "value": text}, _unit(encoder([text])[0])


def start_or_resume(index: SearchIndex, out_dir, *, session_path=None, feedback=None, method: str | None = None,
                    k: int | None = None, **query) -> Session:
    """A new session from the query, or the one saved at ``session_path`` (then no query is needed);
    the judgments of the ``feedback`` file are added."""
    resume = session_path is not None and Path(session_path).is_file() and not any(v is not None for v in (
        query.get("image"), query.get("like"), query.get("text")))
    if resume:
        session = Session.load(session_path)
        session.check(index)
        if method:
            session.method = method
        if k:
            session.k = k
    else:
        desc, vec = query_vector(index, **query)
        session = new_session(index, out_dir, desc, vec, index.model_id, method=method or "knn", k=k or 20)
    if feedback is not None:
        session.judge(index, read_feedback(feedback))
    return session
