"""A resumable embedding store: one SQLite file, one transaction per batch.

Why SQLite rather than shard files plus an index: a commit is atomic and durable (WAL journal),
so a Ctrl-C or a SIGKILL mid-batch loses at most that batch and never leaves a half-written row
or a torn index; lookups by path are indexed; it is one file in the standard library.

A row is keyed by (model id, relative path) and stores the file's size, mtime and ctime (ns): a
row is reused only when all of them still match, so a changed file is embedded again (also after
``cp -p`` or rsync, which keep the mtime but not the ctime) and a different model never reuses
another model's rows.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import numpy as np

from itae_export.errors import InputError, OutputError

SCHEMA = 2  # 2: the key holds the ctime too; a store of another schema is emptied (it is a cache)
STORE_NAME = "cache/embeddings.sqlite"  # the resumable store, inside the output folder


def file_key(path: str | os.PathLike) -> tuple[int, int, int]:
    """(size, mtime_ns, ctime_ns) of a file, the part of the key that detects a changed file."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _db_name(rel: str) -> str:
    """A relative path as stored: itself, or for a name that is not valid UTF-8 (Linux names are
    bytes) NUL + the hex of its bytes. No file name holds a NUL, so the two never collide."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return "\0" + os.fsencode(rel).hex()


def _from_db_name(name: str) -> str:
    return os.fsdecode(bytes.fromhex(name[1:])) if name.startswith("\0") else name


def store_error(path: Path, e: Exception) -> Exception:
    """One line that tells a corrupt store from a full disk or a read-only one."""
    msg = str(e)
    low = msg.lower()
    code = getattr(e, "sqlite_errorcode", None)
    if "full" in low or getattr(e, "errno", None) == errno.ENOSPC or code == 13:  # SQLITE_FULL
        return OutputError(f"{path}: the disk is full; the embedding store is intact: free some space and run "
                           "the same command again to resume")
    if "readonly" in low or "read-only" in low or code in (8,):  # SQLITE_READONLY
        return OutputError(f"{path}: the embedding store cannot be written (read-only filesystem or no "
                           "permission); choose another --out")
    if "unable to open" in low or code == 14:  # SQLITE_CANTOPEN
        return OutputError(f"{path}: the embedding store cannot be opened (no permission, or its folder is not "
                           "writable); choose another --out")
    if "malformed" in low or "not a database" in low or "corrupt" in low or code in (11, 26):
        return InputError(f"{path}: the embedding store is corrupt ({msg}); delete it to start afresh "
                          "(its stored embeddings are then computed again)")
    return OutputError(f"{path}: embedding store error ({msg})")


class EmbeddingStore:
    """Embeddings keyed by (model_id, path, size, mtime_ns, ctime_ns), committed one batch at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint, never torn
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            schema = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if schema is not None and schema[0] != str(SCHEMA):
                self.db.execute("DROP TABLE IF EXISTS embeddings")  # an older layout: a cache, recomputed
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS embeddings (
                    model_id TEXT NOT NULL,
                    path TEXT NOT NULL,
                    size INTEGER NOT NULL,
                    mtime_ns INTEGER NOT NULL,
                    ctime_ns INTEGER NOT NULL,
                    dim INTEGER NOT NULL,
                    vector BLOB NOT NULL,
                    PRIMARY KEY (model_id, path)
                );
                """
            )
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
        except (sqlite3.Error, OSError) as e:
            raise store_error(self.path, e) from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_meta(self, key: str) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as e:
            raise store_error(self.path, e) from None
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        try:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        except sqlite3.Error as e:
            raise store_error(self.path, e) from None

    def lookup(self, model_id: str, keys: dict[str, tuple[int, int, int]]) -> dict[str, np.ndarray]:
        """The stored vectors of those ``{path: file_key}`` whose size, mtime and ctime still match."""
        out: dict[str, np.ndarray] = {}
        try:
            cur = self.db.execute("SELECT path, size, mtime_ns, ctime_ns, vector FROM embeddings WHERE model_id = ?",
                                  (model_id,))
            for name, size, mtime_ns, ctime_ns, blob in cur:
                path = _from_db_name(name)
                if keys.get(path) == (size, mtime_ns, ctime_ns):
                    out[path] = np.frombuffer(blob, dtype=np.float32).copy()
        except sqlite3.Error as e:
            raise store_error(self.path, e) from None
        return out

    def add(self, model_id: str, rows: list[tuple[str, int, int, int]], vectors: np.ndarray) -> None:
        """Store one batch in one transaction: all of it or (after a crash) none of it."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(rows) != len(vectors):
            raise ValueError("rows and vectors differ in length")
        data = [(model_id, _db_name(p), int(s), int(m), int(c), int(v.shape[0]), v.tobytes())
                for (p, s, m, c), v in zip(rows, vectors)]
        try:
            with self.db:  # isolation_level=None: explicit transaction
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?, ?, ?, ?)", data)
        except sqlite3.Error as e:
            raise store_error(self.path, e) from None
