"""The files of an itae-cluster output folder, written as one set and read back checked.

Publication: every file is first written beside the others under a hidden name; the old
summary.json is removed; the new files are renamed into place; summary.json comes last. It names
the run (``run_id``) and the sha256 of every file of the set, so a reader can always tell which run
wrote a file, and a set that a crash left half-published has no summary.json, or one whose hashes
do not match (:func:`read_outputs` says so).

CSV cells: every CSV round-trips through Python's ``csv`` module, whatever characters a name holds
(commas, quotes, ``\n``, ``\r``: a row with a carriage return in a cell has every cell quoted, since
lines end in ``\n``). File names are bytes on Linux; a name that is not valid UTF-8 is written byte
for byte (read it back with ``encoding="utf-8", errors="surrogateescape"``; :func:`read_csv` does).
A text cell that a spreadsheet would run as a formula (it begins with ``=``, ``+``, ``-``, ``@``, a
tab or a carriage return) gets one leading apostrophe ``'``, which spreadsheets show as text; so
does a text cell that begins with an apostrophe of its own, so that :func:`read_csv` can remove
exactly the one it added. Numbers (``-0.5``, ``1e-3``) are written as they are.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
import uuid
from pathlib import Path

import numpy as np

from itae_export.errors import InputError, OutputError
from itae_export.files import atomic_write_bytes, describe_os_error, sha256_file

SUMMARY = "summary.json"
ASSIGNMENTS = "assignments.csv"
EMBEDDINGS = "embeddings.npy"
SKIPPED = "skipped.csv"
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
NEUTRALISE = (*FORMULA_START, "'")  # an apostrophe of the name's own: doubled, so reading removes only ours
CSV_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}
ASSIGNMENTS_PARQUET = "assignments.parquet"
PARQUET_MIN_ROWS = 100_000  # from here on the assignments are also written as parquet (where pyarrow is installed)
CSV_MAX_ROWS = 1_000_000  # itae-embed cluster writes assignments.csv up to here; parquet alone above


def _cell(value) -> str:
    s = str(value)
    if NUMBER.fullmatch(s):
        return s  # a number is data, never a formula: -0.5 stays a number
    return "'" + s if s.startswith(NEUTRALISE) else s


def uncell(s: str) -> str:
    """A cell as it was before :func:`csv_bytes` neutralised it."""
    return s[1:] if s.startswith("'") and s[1:].startswith(NEUTRALISE) else s


def csv_bytes(header: list[str], rows) -> bytes:
    """A CSV file's bytes: formula-like cells neutralised, names kept byte for byte."""
    return csv_text(header, rows).encode(**CSV_ENCODING)


def csv_text(header: list[str], rows) -> str:
    """The text of :func:`csv_bytes`."""
    buf = io.StringIO()
    plain = csv.writer(buf, lineterminator="\n")
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in (header, *rows):
        cells = [_cell(c) for c in row]
        # the writer quotes a cell holding "\n" (the line end) but not one holding a lone "\r"
        (quoted if any("\r" in c for c in cells) else plain).writerow(cells)
    return buf.getvalue()


def parse_csv(text: str, what: str = "CSV") -> list[dict[str, str]]:
    """The rows of CSV text this package wrote, as they were before neutralisation (a cell of a
    short row is ""); text that is not CSV is an InputError naming ``what``."""
    try:
        return [{k: uncell(v or "") for k, v in row.items() if k is not None}
                for row in csv.DictReader(io.StringIO(text, newline=""))]
    except csv.Error as e:
        raise InputError(f"{what}: not a readable CSV ({e})") from None


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV file this package wrote, as they were before neutralisation."""
    try:
        with open(path, newline="", **CSV_ENCODING) as f:
            text = f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({describe_os_error(e)})") from None
    return parse_csv(text, str(path))


def collection_file(root: str | os.PathLike, rel: str) -> Path:
    """``root / rel`` for a path as ``assignments.csv`` lists it: relative, without ``..`` parts or
    NUL; anything else (a forged collection naming ``../../etc/passwd`` or ``/home/x``) is an
    InputError. Lexical only: a symbolic link inside the folder was followed when it was embedded."""
    parts = rel.split("/")
    if not rel or "\0" in rel or rel.startswith("/") or ".." in parts:
        raise InputError(f"{ASSIGNMENTS}: the path {rel!r:.120} is not inside the collection's folder; refused")
    return Path(root) / rel


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def publish(out_dir: Path, files: dict[str, bytes], summary: dict) -> None:
    """Write ``files`` and then ``summary.json`` (with run id and hashes) into ``out_dir`` as one set."""
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    staged = {}
    try:
        for name, data in files.items():  # everything is on disk before the old set is touched
            tmp = out_dir / f".{name}.{run_id}.staged"
            atomic_write_bytes(tmp, data)
            staged[name] = tmp
        summary["run_id"] = run_id
        summary["outputs"] = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                              for name, data in files.items()}
        summary_bytes = (json.dumps(summary, indent=2) + "\n").encode()
        old = out_dir / SUMMARY
        if old.exists():
            old.unlink()  # from here on, a crash leaves no summary: the set is visibly incomplete
        for name, tmp in staged.items():
            os.replace(tmp, out_dir / name)
        staged.clear()
        atomic_write_bytes(out_dir / SUMMARY, summary_bytes)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot publish the outputs ({describe_os_error(e)})") from None
    finally:
        for tmp in staged.values():
            try:
                tmp.unlink()
            except OSError:
                pass


def read_outputs(out_dir: str | os.PathLike) -> dict:
    """summary.json, the rows of assignments.csv, embeddings.npy (same order) and skipped.csv,
    checked to be one set (the hashes in summary.json). An ``itae-embed cluster`` output has no
    embeddings.npy: ``embeddings`` is then None (its vectors are the parts of the shard directory
    its summary names, ``shards``: :func:`~itae_export.data.shards.clustered_vectors`)."""
    out = Path(out_dir)
    need = [SUMMARY, ASSIGNMENTS] + ([] if _sharded(out) else [EMBEDDINGS])
    missing = [n for n in need if not (out / n).is_file()]
    if missing:
        raise InputError(f"{out}: not an itae-cluster output folder, or an incomplete one (missing {', '.join(missing)})")
    try:
        summary = json.loads((out / SUMMARY).read_text())
    except (ValueError, OSError) as e:
        raise InputError(f"{out / SUMMARY}: not readable ({e})") from None
    outputs = summary.get("outputs") if isinstance(summary, dict) else None
    if not isinstance(summary, dict) or not isinstance(outputs or {}, dict):
        raise InputError(f"{out / SUMMARY}: not an itae-cluster summary (expected an object with 'outputs')")
    for name, rec in (outputs or {}).items():
        if not isinstance(name, str) or name != os.path.basename(name) or name in ("", ".", "..") \
                or not isinstance(rec, dict):  # a file of the set, never a path out of the folder
            raise InputError(f"{out / SUMMARY}: lists {name!r:.80}, not a file of an itae-cluster output set")
        p = out / name
        if not p.is_file() or sha256_file(p) != rec.get("sha256"):
            raise InputError(f"{p}: not the file that run {summary.get('run_id')} wrote (summary.json's sha256 "
                             "differs): the folder mixes two runs; run itae-cluster again")
    rows = read_csv(out / ASSIGNMENTS)
    if rows and "path" not in rows[0]:
        raise InputError(f"{out / ASSIGNMENTS}: no 'path' column")
    if _sharded(out):
        emb = None
    else:
        try:
            emb = np.load(out / EMBEDDINGS, allow_pickle=False, mmap_mode="r")  # millions of rows: not read twice
        except (ValueError, OSError, EOFError) as e:
            raise InputError(f"{out / EMBEDDINGS}: not a readable .npy array ({e})") from None
    if emb is not None and (emb.ndim != 2 or emb.dtype.kind != "f"):
        raise InputError(f"{out / EMBEDDINGS}: {emb.dtype} {list(emb.shape)}, not a 2-D float array of embeddings")
    if emb is not None and len(rows) != len(emb):
        raise InputError(f"{out}: {ASSIGNMENTS} has {len(rows)} rows but {EMBEDDINGS} {len(emb)}")
    skipped = read_csv(out / SKIPPED) if (out / SKIPPED).is_file() else []
    return {"summary": summary, "rows": rows, "embeddings": emb, "skipped": skipped}


def _sharded(out: Path) -> bool:
    """An ``itae-embed cluster`` output: no embeddings.npy, a summary naming its shard directory."""
    if (out / EMBEDDINGS).is_file() or not (out / SUMMARY).is_file():
        return False
    try:
        summary = json.loads((out / SUMMARY).read_text())
    except (ValueError, OSError):
        return False  # read_outputs names the unreadable summary
    return isinstance(summary, dict) and isinstance(summary.get("shards"), str)

