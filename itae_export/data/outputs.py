"""The files of an itae-cluster output folder, written as one set and read back checked.

Publication: every file is first written beside the others under a hidden name; the old
summary.json is removed; the new files are renamed into place; summary.json comes last. It names
the run (``run_id``) and the sha256 of every file of the set, so a reader can always tell which run
wrote a file, and a set that a crash left half-published has no summary.json, or one whose hashes
do not match (:func:`read_outputs` says so).

CSV cells: every CSV round-trips through Python's ``csv`` module. File names are bytes on Linux;
a name that is not valid UTF-8 is written byte for byte (read it back with
``encoding="utf-8", errors="surrogateescape"``; :func:`read_csv` does). A cell that a spreadsheet
would run as a formula (it begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return)
gets one leading apostrophe ``'``, which spreadsheets show as text; :func:`read_csv` removes it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np

from itae_export.errors import InputError, OutputError
from itae_export.files import atomic_write_bytes, describe_os_error

SUMMARY = "summary.json"
ASSIGNMENTS = "assignments.csv"
EMBEDDINGS = "embeddings.npy"
SKIPPED = "skipped.csv"
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CSV_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}
ASSIGNMENTS_PARQUET = "assignments.parquet"
PARQUET_MIN_ROWS = 100_000  # from here on the assignments are also written as parquet (where pyarrow is installed)
CSV_MAX_ROWS = 1_000_000  # itae-embed cluster writes assignments.csv up to here; parquet alone above


def _cell(value) -> str:
    s = str(value)
    return "'" + s if s.startswith(FORMULA_START) else s


def _uncell(s: str) -> str:
    return s[1:] if s.startswith("'") and s[1:].startswith(FORMULA_START) else s


def csv_bytes(header: list[str], rows) -> bytes:
    """A CSV file's bytes: formula-like cells neutralised, names kept byte for byte."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([_cell(c) for c in row] for row in rows)
    return buf.getvalue().encode(**CSV_ENCODING)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV this package wrote, as they were before neutralisation."""
    with open(path, newline="", **CSV_ENCODING) as f:
        return [{k: _uncell(v) for k, v in row.items()} for row in csv.DictReader(f)]


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
    checked to be one set (the hashes in summary.json)."""
    out = Path(out_dir)
    need = [SUMMARY, ASSIGNMENTS, EMBEDDINGS]
    missing = [n for n in need if not (out / n).is_file()]
    if missing:
        raise InputError(f"{out}: not an itae-cluster output folder, or an incomplete one (missing {', '.join(missing)})")
    try:
        summary = json.loads((out / SUMMARY).read_text())
    except (ValueError, OSError) as e:
        raise InputError(f"{out / SUMMARY}: not readable ({e})") from None
    for name, rec in (summary.get("outputs") or {}).items():
        p = out / name
        if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != rec.get("sha256"):
            raise InputError(f"{p}: not the file that run {summary.get('run_id')} wrote (summary.json's sha256 "
                             "differs): the folder mixes two runs; run itae-cluster again")
    rows = read_csv(out / ASSIGNMENTS)
    emb = np.load(out / EMBEDDINGS, allow_pickle=False, mmap_mode="r")  # millions of rows: not read twice
    if len(rows) != len(emb):
        raise InputError(f"{out}: {ASSIGNMENTS} has {len(rows)} rows but {EMBEDDINGS} {len(emb)}")
    skipped = read_csv(out / SKIPPED) if (out / SKIPPED).is_file() else []
    return {"summary": summary, "rows": rows, "embeddings": emb, "skipped": skipped}
