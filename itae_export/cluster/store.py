"""A resumable embedding store: one SQLite file, one transaction per batch.

Why SQLite rather than shard files plus an index: a commit is atomic and durable (WAL journal),
so a Ctrl-C or a SIGKILL mid-batch loses at most that batch and never leaves a half-written row
or a torn index; lookups by path are indexed; it is one file in the standard library.

A row is keyed by (model id, relative path) and stores the file's size and mtime (ns): a row is
reused only when all four still match, so a changed file is embedded again and a different model
never reuses another model's rows.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np

from itae_export.errors import InputError
from itae_export.files import sha256_of_files
from itae_export.onnx.contract import EXTERNAL_DATA_SUFFIX
from itae_export.onnx.manifest import manifest_path

SCHEMA = 1
STORE_NAME = "cache/embeddings.sqlite"  # the resumable store, inside the output folder


def file_key(path: str | os.PathLike) -> tuple[int, int]:
    """(size, mtime_ns) of a file, the part of the key that detects a changed file."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def model_fingerprint(onnx_path: str | os.PathLike, cache: "EmbeddingStore | None" = None) -> str:
    """sha256 over the .onnx file, its external-data files and its sidecar manifest.

    Hashing a multi-GB model takes seconds, so with ``cache`` the digest is remembered against
    the files' (path, size, mtime_ns).
    """
    onnx_path = Path(onnx_path).resolve()
    parts = [onnx_path]
    for suffix in (".onnx" + EXTERNAL_DATA_SUFFIX, ".onnx_data", EXTERNAL_DATA_SUFFIX):
        p = onnx_path.with_name(onnx_path.stem + suffix)
        if p.is_file() and p != onnx_path:
            parts.append(p)
    side = manifest_path(onnx_path)
    if side.is_file():
        parts.append(side)
    stamp = "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in parts)
    if cache is not None:
        hit = cache.get_meta("fingerprint:" + stamp)
        if hit:
            return hit
    digest = "sha256:" + sha256_of_files(parts)
    if cache is not None:
        cache.set_meta("fingerprint:" + stamp, digest)
    return digest


class EmbeddingStore:
    """Embeddings keyed by (model_id, path, size, mtime_ns), committed one batch at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint, never torn
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS embeddings (
                    model_id TEXT NOT NULL,
                    path TEXT NOT NULL,
                    size INTEGER NOT NULL,
                    mtime_ns INTEGER NOT NULL,
                    dim INTEGER NOT NULL,
                    vector BLOB NOT NULL,
                    PRIMARY KEY (model_id, path)
                );
                """
            )
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
        except sqlite3.DatabaseError as e:
            raise InputError(f"{self.path}: not a usable embedding store ({e}); delete it to start afresh") from e

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


    def lookup(self, model_id: str, keys: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
        """The stored vectors of those ``{path: (size, mtime_ns)}`` whose size and mtime still match."""
        out: dict[str, np.ndarray] = {}
        cur = self.db.execute("SELECT path, size, mtime_ns, vector FROM embeddings WHERE model_id = ?", (model_id,))
        for path, size, mtime_ns, blob in cur:
            if keys.get(path) == (size, mtime_ns):
                out[path] = np.frombuffer(blob, dtype=np.float32).copy()
        return out

    def add(self, model_id: str, rows: list[tuple[str, int, int]], vectors: np.ndarray) -> None:
        """Store one batch in one transaction: all of it or (after a crash) none of it."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(rows) != len(vectors):
            raise ValueError("rows and vectors differ in length")
        data = [(model_id, p, int(s), int(m), int(v.shape[0]), v.tobytes()) for (p, s, m), v in zip(rows, vectors)]
        with self.db:  # isolation_level=None: explicit transaction
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?, ?, ?)", data)
