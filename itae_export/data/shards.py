"""A directory of embedding shards: per-part parquet files, one manifest, a transactional resume record.

Layout of ``OUT/``::

    manifest.json              the plan: model identity, input, part size, every part's file
    part-00000.parquet         idx int64, key string, vector fixed_size_list<float32>[D],
                               artifacts int32 (flagged tokens per image; -1: the graph has no artifact_mask)
    part-00001.parquet         ... (each written atomically: temporary file, fsync, rename)
    _state/shard-0003-of-0008.sqlite   rows of the parts worker 3 of 8 has begun, one transaction
                                        per batch; a part's rows are dropped once its file is written

A part is complete exactly when its file exists (the rename is atomic), its footer names the
manifest's plan id, every item of its input is accounted for (``itae.accounting``: items = vectors +
skipped, and no member of a tar lost to a cut or a corrupt header) and its content matches the
digest in its footer (``itae.digest``: sha256 over idx, keys, vectors and artifact counts, checked on every read,
with parquet's page checksums; non-finite vectors count as corrupt). A corrupt part is embedded
again by the next ``itae-embed run``; readers refuse it in one line naming the file. A part written
while members of its tar were lost is *incomplete*: written (a rerun cannot do better with the same
tar), but never reported complete. ``manifest.json`` is the same for every worker (it is derived from the input
and the model only), so N workers of a Slurm array can all create it; a worker whose input or model
differ from an existing manifest stops with an error instead of mixing two models in one directory.
Skipped images of a part are listed in its footer (``itae.skipped``, JSON). A part written before
the ``artifacts`` column existed is still complete (its digest covers the other columns); its
images read as :data:`NO_COUNT` (-1, not counted), as for a graph without ``artifact_mask``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from itae_export.data.sources import Part, Source, require_pyarrow, shard_parts, text_key
from itae_export.errors import InputError, OutputError
from itae_export.files import atomic_write_bytes, atomic_write_json

FORMAT = "itae-shards/1"
MANIFEST = "manifest.json"
STATE_DIR = "_state"
PLAN_KEY = b"itae.plan_id"
SKIPPED_KEY = b"itae.skipped"
MODEL_KEY = b"itae.model_id"
ACCOUNTING_KEY = b"itae.accounting"
DIGEST_KEY = b"itae.digest"
NON_FINITE = "the model returned NaN or inf for this image"
ARTIFACTS = "artifacts"  # the per-image count column
NO_COUNT = -1  # an image whose flagged tokens were not counted (no artifact_mask, or a part of an earlier version)
PART_STATES = ("complete", "incomplete", "missing", "foreign", "corrupt", "stale")


def part_name(part_id: int) -> str:
    return f"part-{part_id:05d}.parquet"


def state_name(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]:04d}-of-{shard[1]:04d}.sqlite"


# ---------------------------------------------------------------- manifest


def build_manifest(source: Source, model: dict, part_size: int) -> dict:
    """The plan. ``model``: {"id": fingerprint, "name", "embed_dim", "itae", "precision", "preprocessing"}."""
    plan_id = "sha256:" + hashlib.sha256(f"{FORMAT}\0{model['id']}\0{source.fingerprint}".encode()).hexdigest()
    return {
        "format": FORMAT,
        "plan_id": plan_id,
        "model": model,
        "input": source.describe(),
        "part_size": part_size,
        "embed_dim": model.get("embed_dim"),
        "vector_column": "vector",
        "vector_type": f"fixed_size_list<float32>[{model.get('embed_dim')}]",
        "parts": [{"id": p.id, "file": part_name(p.id), "source": p.source, "n_items": p.n_items}
                  for p in source.parts],
    }


def open_manifest(out: Path, manifest: dict) -> dict:
    """Create ``out/manifest.json``, or check that the one there is the same plan; returns it."""
    path = out / MANIFEST
    if path.is_file():
        old = read_manifest(out)
        if old.get("plan_id") != manifest["plan_id"]:
            what = ("model" if old.get("model", {}).get("id") != manifest["model"]["id"] else "input")
            raise InputError(f"{path}: this directory holds shards of another {what} "
                             f"({old.get('model', {}).get('name')} on {old.get('input', {}).get('location')}); "
                             "use another --out")
        return old
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)  # every worker writes the same bytes: a race is harmless
    return manifest


def read_manifest(out: str | os.PathLike) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise InputError(f"{out}: no {MANIFEST} (not a shard directory written by itae-embed)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise InputError(f"{path}: format {got!r} is not {FORMAT!r}")
    for key, kind in (("plan_id", str), ("parts", list), ("model", dict)):
        if not isinstance(m.get(key), kind):
            raise InputError(f"{path}: '{key}' is missing or not a {kind.__name__}; not a shard manifest")
    if m.get("embed_dim") is not None and (isinstance(m["embed_dim"], bool) or not isinstance(m["embed_dim"], int)
                                           or m["embed_dim"] < 1):
        raise InputError(f"{path}: 'embed_dim' {m['embed_dim']!r} is not a positive integer")
    return m


# ---------------------------------------------------------------- part files


def part_table(idx: np.ndarray, keys: list[str], vectors: np.ndarray, artifacts=None):
    """An Arrow table with the vector column as fixed_size_list<float32>[D] (not Ray's tensor type,
    which plain pyarrow reads back as a variable-length list), and the ``artifacts`` column (int32)
    when ``artifacts`` is given."""
    pa, _ = require_pyarrow("shard files")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    d = vectors.shape[1]
    vec = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), d)
    cols = {"idx": pa.array(np.asarray(idx, np.int64)), "key": pa.array(keys, type=pa.string()), "vector": vec}
    if artifacts is not None:
        cols[ARTIFACTS] = pa.array(np.asarray(artifacts, np.int32))
    return pa.table(cols)


def part_digest(idx, keys: list[str], vectors: np.ndarray, artifacts=None) -> str:
    """sha256 over a part's content: idx (int64 LE), keys (UTF-8, NUL-separated), vectors (float32 LE)
    and, for a part with the column, the artifact counts (a marker, then int32 LE)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(idx, dtype="<i8").tobytes())
    h.update("\0".join(keys).encode("utf-8"))
    h.update(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
    if artifacts is not None:
        h.update(b"\0itae.artifacts\0" + np.ascontiguousarray(artifacts, dtype="<i4").tobytes())
    return "sha256:" + h.hexdigest()


def write_part(out: Path, part_id: int, idx, keys: list[str], vectors: np.ndarray, *, plan_id: str,
               model_id: str, skipped: list[tuple[str, str]], n_items: int | None = None,
               unaccounted: str | None = None, stamp: str | None = None, artifacts=None) -> Path:
    """Write one part file atomically (the vector column uncompressed: float32 does not compress).

    ``n_items``: the items of the part's input (default: vectors + skipped); they must add up.
    ``unaccounted``: why members of the input are lost (the part is then written but incomplete).
    ``stamp``: the input's :attr:`~itae_export.data.sources.Part.stamp` (a tar's size), recorded.
    ``artifacts``: each vector's flagged-token count (default: :data:`NO_COUNT` for all)."""
    pa, pq = require_pyarrow("shard files")
    n_items = len(keys) + len(skipped) if n_items is None else n_items
    if len(keys) + len(skipped) != n_items:
        raise InputError(f"{out / part_name(part_id)}: {len(keys)} vectors + {len(skipped)} skipped is not the "
                         f"{n_items} items of the part; not written")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise InputError(f"{out / part_name(part_id)}: NaN or inf among the vectors; not written")
    artifacts = np.full(len(keys), NO_COUNT, np.int32) if artifacts is None else np.asarray(artifacts, np.int32)
    if len(artifacts) != len(keys):
        raise InputError(f"{out / part_name(part_id)}: {len(artifacts)} artifact counts for {len(keys)} vectors; "
                         "not written")
    table = part_table(idx, keys, vectors, artifacts)
    accounting = {"items": n_items, "embedded": len(keys), "skipped": len(skipped), "unaccounted": unaccounted,
                  "stamp": stamp}
    meta = {PLAN_KEY: plan_id.encode(), MODEL_KEY: model_id.encode(),
            SKIPPED_KEY: json.dumps(skipped).encode(), ACCOUNTING_KEY: json.dumps(accounting).encode(),
            DIGEST_KEY: part_digest(idx, keys, vectors, artifacts).encode()}
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression={"idx": "zstd", "key": "zstd", "vector": "none"},
                   use_dictionary=["key"], row_group_size=65_536, write_page_checksum=True)
    path = out / part_name(part_id)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return path


def part_status(out: Path, part_id: int, plan_id: str, verify: bool = True,
                stamp: str | None = None, digest: str | None = None) -> tuple[str, str | None]:
    """(state, why) of one part file; state is one of :data:`PART_STATES`:

    - ``complete``: written for this plan, every item accounted for, content matching its digest;
    - ``incomplete``: written for this plan, but members of its tar were lost (``why`` says how);
    - ``missing``: no file; ``foreign``: a file of another plan (or no itae part at all);
    - ``corrupt``: unreadable, counts that do not add up, a digest that differs, or NaN/inf;
    - ``stale``: written from another version of its input (``stamp`` given and differing).

    ``verify=False`` checks only the footer (plan, accounting), not the content. ``digest``: the one
    the resume record kept when the part was written (:func:`recorded_digests`); a footer naming
    another (the file replaced by another, self-consistent one) is corrupt."""
    path = Path(out) / part_name(part_id)
    if not path.is_file():
        return "missing", None
    _, pq = require_pyarrow("shard files")
    try:
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.metadata or {}
        num_rows = pf.metadata.num_rows
    except Exception as e:  # noqa: BLE001 - pyarrow's error types vary: a torn or foreign file
        return "corrupt", f"not a readable parquet file ({_one_line(e)})"
    if meta.get(PLAN_KEY) != plan_id.encode():
        return "foreign", "written for another plan" if PLAN_KEY in meta else "not a part file written by itae-embed"
    try:
        acc = json.loads(meta[ACCOUNTING_KEY])
        skipped = json.loads(meta.get(SKIPPED_KEY, b"[]"))
        footer_digest = meta[DIGEST_KEY].decode()
        items = int(acc["items"])
    except (KeyError, ValueError, TypeError) as e:
        return "corrupt", f"its footer has no valid accounting or digest ({type(e).__name__}: {e})"
    if digest is not None and footer_digest != digest:
        return "corrupt", "its digest is not the one recorded in _state when it was written (the file was replaced)"
    if num_rows != acc.get("embedded") or len(skipped) != acc.get("skipped") or num_rows + len(skipped) != items:
        return "corrupt", (f"{num_rows} vectors + {len(skipped)} skipped do not add up to its {items} items "
                           f"(the footer records {acc.get('embedded')} + {acc.get('skipped')})")
    if verify:
        why = _verify_content(path, footer_digest)
        if why is not None:
            return "corrupt", why
    if stamp is not None and acc.get("stamp") not in (None, stamp):
        return "stale", f"written from its input at {acc.get('stamp')}, which is now {stamp}"
    if acc.get("unaccounted"):
        return "incomplete", str(acc["unaccounted"])
    return "complete", None


def _verify_content(path: Path, digest: str) -> str | None:
    """None when the part's content matches ``digest`` and every vector is finite; else what is wrong."""
    try:
        t, vecs = read_part(path)
        counts = part_artifacts(path, missing=None)
    except Exception as e:  # noqa: BLE001 - a flipped byte in a page header or a checksum that differs
        return f"unreadable content ({_one_line(e)})"
    idx = t.column("idx").to_numpy()
    keys = t.column("key").to_pylist()
    if part_digest(idx, keys, vecs, counts) != digest:
        return "its content differs from the digest in its footer (flipped bytes?)"
    bad = int((~np.isfinite(vecs)).any(axis=1).sum())
    if bad:
        return f"{bad} of its vectors hold NaN or inf"
    return None


def _text(s: str) -> str:
    """``s`` as valid UTF-8 text: undecodable bytes of a name (surrogate escapes) become ``\\xNN``."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def part_complete(out: Path, part_id: int, plan_id: str, verify: bool = True) -> bool:
    """True when the part is written for ``plan_id`` with every item accounted for and its content intact."""
    return part_status(out, part_id, plan_id, verify)[0] == "complete"


def read_part(path: str | os.PathLike, columns=("idx", "key", "vector")):
    """(table, vectors float32 [n, D] viewing the table's buffer: no copy) of one part file (page
    checksums verified)."""
    _, pq = require_pyarrow("shard files")
    t = pq.read_table(path, columns=list(columns), memory_map=True, page_checksum_verification=True)
    vecs = None
    if "vector" in columns:
        col = t.column("vector").combine_chunks()
        d = col.type.list_size
        vecs = col.flatten().to_numpy(zero_copy_only=True).reshape(-1, d) if len(col) else np.zeros((0, d), np.float32)
    return t, vecs


def part_artifacts(path: str | os.PathLike, missing: int | None = NO_COUNT) -> np.ndarray | None:
    """The ``artifacts`` column of one part file (int32, one per vector). A part written before the
    column existed: ``missing`` for every row (None: return None)."""
    _, pq = require_pyarrow("shard files")
    if ARTIFACTS not in pq.read_schema(path).names:
        return None if missing is None else np.full(pq.read_metadata(path).num_rows, missing, np.int32)
    t = pq.read_table(path, columns=[ARTIFACTS], memory_map=True, page_checksum_verification=True)
    return t.column(ARTIFACTS).to_numpy().astype(np.int32)


# ---------------------------------------------------------------- resume record


class ShardState:
    """Rows of the parts a worker has begun: one SQLite transaction per batch (all or nothing)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(path), timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript("""
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS rows (
                    part INTEGER NOT NULL, pos INTEGER NOT NULL, key TEXT NOT NULL,
                    vector BLOB, reason TEXT, artifacts INTEGER, PRIMARY KEY (part, pos));
            """)
            if "artifacts" not in {r[1] for r in self.db.execute("PRAGMA table_info(rows)")}:
                self.db.execute("ALTER TABLE rows ADD COLUMN artifacts INTEGER")  # a record of an earlier version
        except sqlite3.DatabaseError as e:
            low = str(e).lower()
            if "full" in low:  # a healthy record on a full disk: never advise deleting it
                raise OutputError(f"{path}: the disk is full; the resume record is intact: free some space and run "
                                  "the same command again to resume") from None
            if "readonly" in low or "read-only" in low or "unable to open" in low:
                raise OutputError(f"{path}: the resume record cannot be written (read-only filesystem or no "
                                  "permission); choose another --out") from None
            raise InputError(f"{path}: not a usable resume record ({e}); move it away (or delete it) and run the same "
                             "command again: the part files written are kept and checked, and only the images no "
                             "part holds are embedded again") from e
        self.path = path

    def close(self) -> None:
        self.db.close()

    def check_plan(self, plan_id: str) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key='plan_id'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('plan_id', ?)", (plan_id,))
        elif row[0] != plan_id:
            raise InputError(f"{self.path}: resume record of another plan; delete it")

    def record_digest(self, part: int, digest: str) -> None:
        """Keep a written part's digest (with the time: the newest record wins across workers' files)."""
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"digest:{part}", f"{time.time_ns()} {digest}"))

    def check_stamp(self, part: int, stamp: str | None) -> bool:
        """Record the stamp of the input a part's rows come from; rows of another stamp (a tar
        replaced since) are dropped. True when rows were dropped."""
        if stamp is None:
            return False
        key = f"stamp:{part}"
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is not None and row[0] == stamp:
            return False
        dropped = bool(self.count(part))
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM rows WHERE part = ?", (part,))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, stamp))
        return dropped

    def add(self, part: int, rows: list[tuple]) -> None:
        """Commit one batch: (pos, key, vector or None, skip reason or None[, artifact count]) per
        image (no count: :data:`NO_COUNT`). A key that is
        not valid UTF-8 (a file or member name is bytes) is kept as :func:`~itae_export.data.sources.text_key`
        writes it (each invalid byte as ``\\xNN``); such bytes in a reason are shown as ``\\xNN``."""
        data = [(part, int(pos), text_key(key), None if v is None else np.asarray(v, np.float32).tobytes(),
                 None if reason is None else _text(reason), int(NO_COUNT if count is None else count))
                for pos, key, v, reason, count in (tuple(r) + (None,) * (5 - len(r)) for r in rows)]
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT OR REPLACE INTO rows (part, pos, key, vector, reason, artifacts) "
                                "VALUES (?, ?, ?, ?, ?, ?)", data)

    def done_positions(self, part: int) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT pos FROM rows WHERE part = ?", (part,))}

    def count(self, part: int | None = None) -> int:
        if part is None:
            return self.db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM rows WHERE part = ?", (part,)).fetchone()[0]

    def rows(self, part: int):
        return self.db.execute("SELECT pos, key, vector, reason, COALESCE(artifacts, ?) FROM rows WHERE part = ? "
                               "ORDER BY pos", (NO_COUNT, part))

    def drop(self, part: int) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM rows WHERE part = ?", (part,))


# ---------------------------------------------------------------- one worker's run


@dataclass
class RunStats:
    parts_total: int = 0  # parts of this worker
    parts_done_before: int = 0  # complete when the run began
    parts_written: int = 0
    rows_resumed: int = 0  # rows found in the resume record (not embedded again)
    reused: int = 0  # images found in the shared embedding cache (not embedded again)
    embedded: int = 0  # images embedded by this run
    skipped: int = 0  # images this run could not decode
    seconds: float = 0.0
    conversions: dict = field(default_factory=dict)
    actor_pids: list = field(default_factory=list)  # Ray engine: the processes that ran inference
    incomplete: dict = field(default_factory=dict)  # part id -> why members of its tar are lost

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 and self.embedded else 0.0


class ShardRun:
    """What one worker (``shard`` = (i, N)) has to do in ``out``, and the writes as it goes."""

    def __init__(self, source: Source, out: str | os.PathLike, model: dict, *, shard: tuple[int, int] = (0, 1),
                 part_size: int, log: Callable[[str], None] | None = None):
        self.out = Path(out).resolve()
        self.source = source
        self.shard = shard
        self.manifest = open_manifest(self.out, build_manifest(source, model, part_size))
        self.plan_id = self.manifest["plan_id"]
        self.model_id = model["id"]
        self.dim = int(model["embed_dim"]) if model.get("embed_dim") else None
        self.state = ShardState(self.out / STATE_DIR / state_name(shard))
        self.state.check_plan(self.plan_id)
        self.stats = RunStats()
        mine = shard_parts(source.parts, shard)
        self.stats.parts_total = len(mine)
        self.todo: list[Part] = []
        say = log or (lambda m: None)
        digests = recorded_digests(self.out)
        for p in mine:
            state, why = part_status(self.out, p.id, self.plan_id, stamp=p.stamp, digest=digests.get(p.id))
            if state in ("complete", "incomplete"):  # incomplete: the same tar cannot give more
                self.stats.parts_done_before += 1
                if state == "incomplete":
                    self.stats.incomplete[p.id] = why
                if self.state.count(p.id):
                    self.state.drop(p.id)  # killed after the rename, before the rows were dropped
            else:
                if state in ("corrupt", "stale"):
                    say(f"{self.out / part_name(p.id)}: {state} ({why}); embedding it again")
                if self.state.check_stamp(p.id, p.stamp):
                    say(f"part {p.id}: its input changed since it was begun; its rows are embedded again")
                self.todo.append(p)
                for stale in self.out.glob(f".{part_name(p.id)}.*.tmp"):  # a write killed half-way
                    stale.unlink(missing_ok=True)
        say(
            f"Shard {shard[0]}/{shard[1]}: {len(mine)} parts, {self.stats.parts_done_before} already complete")

    def close(self) -> None:
        self.state.close()

    def __enter__(self) -> "ShardRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pending(self) -> Iterator[tuple[Part, int, list]]:
        """(part, its number of items, its items still to embed) for each part of this worker without a
        file; items already in the resume record are left out (and counted as resumed)."""
        for part in self.todo:
            items = part.items()
            done = self.state.done_positions(part.id)
            self.stats.rows_resumed += len(done)
            yield part, len(items), [it for it in items if it.pos not in done]

    def add(self, part: int, rows) -> None:
        self.state.add(part, rows)
        for row in rows:
            if row[2] is None:
                self.stats.skipped += 1
            else:
                self.stats.embedded += 1

    def finish_part(self, part: Part, n_items: int) -> Path:
        """Write the part's file from its committed rows (all ``n_items`` must be there), then drop them."""
        if self.state.count(part.id) != n_items:
            raise InputError(f"{self.out / part_name(part.id)}: {self.state.count(part.id)} of the part's {n_items} "
                             f"items have an outcome in {self.state.path}; not written")
        pos, keys, vecs, skipped, counts = [], [], [], [], []
        for p, key, blob, reason, count in self.state.rows(part.id):
            v = None if blob is None else np.frombuffer(blob, np.float32)
            if v is not None and self.dim and v.size != self.dim:
                raise InputError(f"{self.state.path}: a row of part {part.id} holds {v.size} values, not "
                                 f"{self.dim}; the resume record is damaged: delete it and run again")
            if v is not None and not np.isfinite(v).all():
                blob, reason = None, NON_FINITE
            if blob is None:
                skipped.append((key, reason))
            else:
                pos.append(p)
                keys.append(key)
                vecs.append(v)
                counts.append(count)
        dim = self.dim or (len(vecs[0]) if vecs else 0)
        mat = np.stack(vecs) if vecs else np.zeros((0, dim), np.float32)
        lost = part.unaccounted()
        path = write_part(self.out, part.id, pos, keys, mat, plan_id=self.plan_id, model_id=self.model_id,
                          skipped=skipped, n_items=n_items, unaccounted=lost, stamp=part.stamp, artifacts=counts)
        self.state.record_digest(part.id, part_digest(pos, keys, mat, np.asarray(counts, np.int32)))
        if lost is not None:
            self.stats.incomplete[part.id] = lost
        self.state.drop(part.id)
        self.stats.parts_written += 1
        return path


# ---------------------------------------------------------------- reading a whole directory


@dataclass
class ShardSet:
    """The complete parts of a shard directory, read one at a time (never all at once)."""

    root: Path
    manifest: dict
    files: list[Path]
    counts: list[int]
    missing: list[int]
    incomplete: dict = field(default_factory=dict)  # part id -> why members of its tar are lost
    damaged: dict = field(default_factory=dict)  # part id -> "corrupt (why)" or "foreign (why)" (among missing)

    @property
    def n(self) -> int:
        return int(sum(self.counts))

    @property
    def dim(self) -> int:
        return int(self.manifest["embed_dim"])

    def vectors(self) -> Iterator[np.ndarray]:
        """Each part's vectors in turn, [n_i, D] float32 (a view of that part's Arrow buffer)."""
        for f in self.files:
            yield read_part(f, columns=("vector",))[1]

    def keys(self) -> list[str]:
        out: list[str] = []
        for f in self.files:
            out.extend(read_part(f, columns=("key",))[0].column("key").to_pylist())
        return out

    def artifacts(self) -> np.ndarray:
        """Every vector's flagged-token count, int32 in key order (:data:`NO_COUNT` where not counted)."""
        got = [part_artifacts(f) for f in self.files]
        return np.concatenate(got) if got else np.zeros(0, np.int32)

    def skipped(self) -> list[tuple[str, str]]:
        _, pq = require_pyarrow("shard files")
        out: list[tuple[str, str]] = []
        for f in self.files:
            meta = pq.read_schema(f).metadata or {}
            out.extend(tuple(x) for x in json.loads(meta.get(SKIPPED_KEY, b"[]")))
        return out

    def load_all(self) -> np.ndarray:
        """All vectors in one [n, D] array: each part is copied into it once, then released."""
        x = np.empty((self.n, self.dim), np.float32)
        at = 0
        for v in self.vectors():
            x[at:at + len(v)] = v
            at += len(v)
        return x


def recorded_digests(root: Path) -> dict[int, str]:
    """{part id: digest} as the resume records of ``root/_state`` kept them when each part was written
    (read only; a record that cannot be read adds nothing: the footers' digests still hold)."""
    newest: dict[int, tuple[int, str]] = {}
    for f in sorted((Path(root) / STATE_DIR).glob("shard-*.sqlite")):
        try:
            db = sqlite3.connect(f.resolve().as_uri() + "?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT key, value FROM meta WHERE key LIKE 'digest:%'").fetchall()
            finally:
                db.close()
        except sqlite3.Error:
            continue
        for key, value in rows:
            t, _, digest = str(value).partition(" ")
            if key[7:].isdigit() and t.isdigit() and int(t) > newest.get(int(key[7:]), (-1, ""))[0]:
                newest[int(key[7:])] = (int(t), digest)
    return {pid: digest for pid, (_, digest) in newest.items()}


def manifest_parts(root: Path, manifest: dict) -> list[tuple[int, Path]]:
    """(id, file) of every part a manifest names; a file that is not ``part-<id>.parquet`` directly
    inside ``root`` (``../x``, an absolute path, another part's name) is refused: a manifest never
    points a reader outside the shard folder."""
    out = []
    parts = manifest.get("parts")
    if not isinstance(parts, list):
        raise InputError(f"{root / MANIFEST}: no list of parts")
    for p in parts:
        pid = p.get("id") if isinstance(p, dict) else None
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
            raise InputError(f"{root / MANIFEST}: a part without a valid id ({p!r:.80})")
        if p.get("file") != part_name(pid):
            raise InputError(f"{root / MANIFEST}: part {pid} names the file {p.get('file')!r:.80}, not "
                             f"{part_name(pid)!r} inside the shard folder; refused")
        out.append((pid, root / part_name(pid)))
    return out


def open_shards(root: str | os.PathLike, allow_partial: bool = False) -> ShardSet:
    """The parts of a shard directory, each checked (plan, accounting, digest, finite vectors).

    A missing, corrupt or incomplete part is an InputError naming it, unless ``allow_partial``: then
    missing and corrupt parts are left out (listed in ``missing``) and incomplete ones are read."""
    _, pq = require_pyarrow("shard files")
    root = Path(root)
    m = read_manifest(root)
    files, counts, missing = [], [], []
    problems: list[str] = []
    incomplete: dict[int, str] = {}
    damaged: dict[int, str] = {}
    digests = recorded_digests(root)
    for pid, f in manifest_parts(root, m):
        state, why = part_status(root, pid, m["plan_id"], digest=digests.get(pid))
        if state == "incomplete":
            incomplete[pid] = why
            problems.append(f"{f}: incomplete ({why})")
        elif state != "complete":
            missing.append(pid)
            if state != "missing":
                damaged[pid] = f"{state} ({why})"
                problems.append(f"{f}: {damaged[pid]}")
            continue
        files.append(f)
        counts.append(pq.read_metadata(f).num_rows)
    if (missing or incomplete) and not allow_partial:
        if problems:
            more = f" (and {len(problems) - 1} more parts)" if len(problems) > 1 else ""
            fix = ("fetch its tar again, then run itae-embed run again" if ": incomplete (" in problems[0]
                   else "run itae-embed run again to embed it again")
            raise InputError(f"{problems[0]}{more}; {fix}, or pass --allow-partial")
        ids = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise InputError(f"{root}: {len(missing)} of {len(m['parts'])} parts are not written yet (parts {ids}); "
                         "run the missing itae-embed shards first")
    return ShardSet(root, m, files, counts, missing, incomplete, damaged)


def clustered_vectors(summary: dict, n_rows: int, where: str | os.PathLike) -> np.ndarray:
    """The vectors an ``itae-embed cluster`` output (``where``, its summary ``summary``) clustered,
    in the order of its assignments: the parts of the shard directory it names, checked to be of
    the same model and as many as its ``n_rows`` assignments."""
    shards = open_shards(summary["shards"], allow_partial=True)
    if shards.manifest.get("model", {}).get("id") != summary.get("model_id") or shards.n != n_rows:
        raise InputError(f"{summary['shards']}: not the shard directory {where} was clustered from "
                         f"({shards.n} vectors for {n_rows} assignments); run itae-embed cluster again")
    return shards.load_all()
