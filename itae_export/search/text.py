"""Text queries: an exported CLIP text tower (``text.onnx`` + ``text.json``) and its tokenizer
files, all in one folder written by :func:`itae_export.onnx.text_export.export_text_tower`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from itae_export.errors import InputError
from itae_export.onnx.contract import (
    TEXT_CONTEXT_LENGTH,
    TEXT_INPUT_NAME,
    TEXT_MANIFEST_NAME,
    TEXT_ONNX_NAME,
    TEXT_OUTPUT_EMBEDDING,
)
from itae_export.runtime import CPU_EP, CUDA_EP, ort_session, resolve_device
from itae_export.search.index import SearchIndex
from itae_export.search.tokenizer import ClipTokenizer

TEXT_ONNX, TEXT_MANIFEST = TEXT_ONNX_NAME, TEXT_MANIFEST_NAME


def read_text_manifest(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / TEXT_MANIFEST
    if not path.is_file():
        raise InputError(f"--text-model: {folder}: no {TEXT_MANIFEST} (export one with itae-search export-text)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


class TextEncoder:
    """Tokenise and embed texts with an exported text tower; float32 [n, E] (not normalised)."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu"):

        self.folder = Path(folder)
        self.manifest = read_text_manifest(self.folder)
        self.tokenizer = ClipTokenizer(self.folder, self.manifest.get("context_length", TEXT_CONTEXT_LENGTH))
        provider, _ = resolve_device(device)
        providers = [CUDA_EP, CPU_EP] if provider == CUDA_EP else [CPU_EP]
        try:
            self.session = ort_session(self.folder / TEXT_ONNX, providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own types
            raise InputError(f"{self.folder / TEXT_ONNX}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from e

    def check_index(self, index: SearchIndex) -> None:
        """Text and images meet only when both towers come from the same checkpoint file."""
        w = (self.manifest.get("weights") or {}).get("sha256")
        if not w or not index.weights_sha256 or w != index.weights_sha256 or self.manifest.get("model") != index.model:
            raise InputError(
                f"--text-model {self.folder}: exported from {self.manifest.get('model')} weights "
                f"{(w or 'unknown')[:12]}…, but the index holds images of {index.model} weights "
                f"{(index.weights_sha256 or 'unknown')[:12]}…; export the text tower from the same checkpoint")

    def __call__(self, texts: list[str]) -> np.ndarray:
        (out,) = self.session.run([TEXT_OUTPUT_EMBEDDING], {TEXT_INPUT_NAME: self.tokenizer(texts)})
        return np.asarray(out, np.float32)
