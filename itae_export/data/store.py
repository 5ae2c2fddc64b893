"""The embedding store: one SQLite file in a cache shared by every output folder and every command.

Where: ``$ITAE_CACHE_DIR/embeddings.sqlite``, by default ``${XDG_CACHE_HOME:-~/.cache}/itae-export/``
(:func:`cache_dir`). ``itae-cluster`` and ``itae-embed run`` both look an image up there before
embedding it, so a second run of the same images with the same model embeds nothing, whatever its
``--out``.

Why SQLite rather than parquet parts plus a resume record: a commit is atomic and durable (WAL
journal), so a Ctrl-C or a SIGKILL mid-batch loses at most that batch and never leaves a half-written
row; a lookup by key is an index probe, not a scan of every part ever written; rows of many folders,
models and runs share one file without a compaction step; several processes on one machine can read
while one writes. Parquet stays the *output* format of the sharded stage (``itae-embed``), where
files are written once and read by other tools.

A row is keyed by (model id, source key). The source key is bytes (file names are bytes on Linux,
so any name works): the absolute path of a file, or for a tar member the tar's absolute path, a NUL
and the member's offset. Beside it: the file's (size, mtime_ns, ctime_ns) (a tar's, for a member):
a row is reused only when all three still match, so a changed file is embedded again (also after
``cp -p`` or rsync, which keep the mtime but not the ctime), and a different model never reuses
another model's rows. The model id is :func:`~itae_export.onnx.identity.model_fingerprint`; an
extra output of the graph (e.g. ``embedding_unpatched``) is stored under ``<fingerprint>#<output>``.
Each row also holds the image's artifact count (True entries of the graph's ``artifact_mask`` row;
-1 when the graph has no such output).
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import numpy as np

from itae_export.errors import InputError, OutputError

SCHEMA = 3  # 3: shared cache, bytes keys, artifact counts
CACHE_ENV = "ITAE_CACHE_DIR"
STORE_FILE = "embeddings.sqlite"
LEGACY_STORE_NAME = "cache/embeddings.sqlite"  # the per-output-folder store of itae-export before issue 21
_CHUNK = 500  # keys per lookup query (SQLite's host-parameter limit is 999 on old builds)

FileKey = tuple[int, int, int]


def cache_dir() -> Path:
    """``$ITAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/itae-export``, else ``~/.cache/itae-export``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "itae-export"


def default_store_path() -> Path:
    return cache_dir() / STORE_FILE


def file_key(path: str | os.PathLike) -> FileKey:
    """(size, mtime_ns, ctime_ns) of a file, the part of the key that detects a changed file."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def source_key(path: str | os.PathLike, offset: int = -1) -> bytes:
    """The store key of a file (its absolute path's bytes) or of a tar member (tar path, NUL, offset)."""
    b = os.fsencode(os.path.abspath(path))
    return b if offset < 0 else b + b"\0" + str(int(offset)).encode()


def extra_model_id(model_id: str, output: str) -> str:
    """The identity under which an extra graph output's vectors are stored."""
    return f"{model_id}#{output}"


def store_error(path: Path, e: Exception) -> Exception:
    """One line that tells a corrupt store from a full disk or a read-only one."""
    msg = str(e)
    low = msg.lower()
    code = getattr(e, "sqlite_errorcode", None)
    move = f"set {CACHE_ENV} to a writable folder"
    if ("full" in low or getattr(e, "errno", None) == errno.ENOSPC or code == 13  # SQLITE_FULL
            or ("disk i/o" in low and _nearly_full(path))):  # a WAL write on a full disk fails as an I/O error
        return OutputError(f"{path}: the disk is full; the embedding cache is intact: free some space (or {move} "
                           "on another disk) and run the same command again to resume")
    if "readonly" in low or "read-only" in low or code in (8,) or getattr(e, "errno", None) in (errno.EROFS,
                                                                                                errno.EACCES):
        return OutputError(f"{path}: the embedding cache cannot be written (read-only filesystem or no "
                           f"permission); {move}")
    if "unable to open" in low or code == 14 or isinstance(e, OSError):  # SQLITE_CANTOPEN
        return OutputError(f"{path}: the embedding cache cannot be opened (no permission, or its folder is not "
                           f"writable); {move}")
    if "malformed" in low or "not a database" in low or "corrupt" in low or code in (11, 26):
        return InputError(f"{path}: the embedding cache is corrupt ({msg}); move it away or delete it (its "
                          f"embeddings are then computed again), or {move}")
    return OutputError(f"{path}: embedding cache error ({msg})")


def _nearly_full(path: Path) -> bool:
    """Less than 1 MiB free where ``path`` lives."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


class EmbeddingStore:
    """Vectors keyed by (model_id, source key), checked against (size, mtime_ns, ctime_ns), committed one
    batch at a time. ``EmbeddingStore()`` opens the shared cache (:func:`default_store_path`)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_store_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint, never torn
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            schema = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if schema is not None and schema[0] != str(SCHEMA):
                self.db.execute("DROP TABLE IF EXISTS embeddings")  # an older layout: a cache, recomputed
                self.db.execute("DROP TABLE IF EXISTS vectors")
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS vectors (
                    model_id TEXT NOT NULL,
                    key BLOB NOT NULL,
                    size INTEGER NOT NULL,
                    mtime_ns INTEGER NOT NULL,
                    ctime_ns INTEGER NOT NULL,
                    vector BLOB NOT NULL,
                    artifacts INTEGER NOT NULL,
                    PRIMARY KEY (model_id, key)
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

    def lookup(self, model_id: str, keys: dict[bytes, FileKey]) -> dict[bytes, tuple[np.ndarray, int]]:
        """(vector, artifact count) of those ``{source key: file key}`` whose size, mtime and ctime still match."""
        out: dict[bytes, tuple[np.ndarray, int]] = {}
        wanted = list(keys)
        try:
            for i in range(0, len(wanted), _CHUNK):
                chunk = wanted[i:i + _CHUNK]
                q = ("SELECT key, size, mtime_ns, ctime_ns, vector, artifacts FROM vectors WHERE model_id = ? AND key IN "
                     f"({','.join('?' * len(chunk))})")
                for key, size, mtime_ns, ctime_ns, blob, artifacts in self.db.execute(q, (model_id, *chunk)):
                    key = bytes(key)
                    if keys.get(key) == (size, mtime_ns, ctime_ns):
                        out[key] = (np.frombuffer(blob, dtype=np.float32).copy(), int(artifacts))
        except sqlite3.Error as e:
            raise store_error(self.path, e) from None
        return out

    def add(self, model_id: str, rows: list[tuple[bytes, int, int, int]], vectors: np.ndarray,
            artifacts=None, extra: dict[str, np.ndarray] | None = None) -> None:
        """Store one batch in one transaction: all of it or (after a crash) none of it. ``rows``:
        (source key, size, mtime_ns, ctime_ns); ``artifacts``: one count per row (default -1);
        ``extra``: {output name: vectors} stored under :func:`extra_model_id`."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(rows) != len(vectors):
            raise ValueError("rows and vectors differ in length")
        arts = [-1] * len(rows) if artifacts is None else [int(a) for a in artifacts]
        data = [(model_id, bytes(k), int(s), int(m), int(c), v.tobytes(), a)
                for (k, s, m, c), v, a in zip(rows, vectors, arts)]
        for name, vecs in (extra or {}).items():
            vecs = np.asarray(vecs, dtype=np.float32)
            data += [(extra_model_id(model_id, name), bytes(k), int(s), int(m), int(c), v.tobytes(), -1)
                     for (k, s, m, c), v in zip(rows, vecs)]
        try:
            with self.db:  # isolation_level=None: explicit transaction
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?, ?, ?, ?)", data)
        except sqlite3.Error as e:
            raise store_error(self.path, e) from None

    def count(self, model_id: str | None = None) -> int:
        try:
            if model_id is None:
                return self.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
            return self.db.execute("SELECT COUNT(*) FROM vectors WHERE model_id = ?", (model_id,)).fetchone()[0]
        except sqlite3.Error as e:
            raise store_error(self.path, e) from None


def check_legacy_store(out_dir: Path) -> None:
    """An ``OUT/cache/embeddings.sqlite`` of an earlier version is refused with one line: its rows lack
    the artifact counts this version stores, so they cannot be carried over (the images are embedded
    once more, into the shared cache)."""
    old = Path(out_dir) / LEGACY_STORE_NAME
    if old.exists() and old.resolve() != default_store_path().resolve():  # not the shared cache itself
        raise InputError(f"{old}: an embedding store of an earlier itae-export; embeddings now live in the shared "
                         f"cache ({cache_dir()}, ${CACHE_ENV} moves it) and its rows lack the artifact counts: delete "
                         f"{old.parent} (its images are embedded again, once) or choose another --out")
