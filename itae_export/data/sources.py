"""Inputs of the sharded embed stage: a folder, a list of paths, or WebDataset tar shards.

Every input becomes an ordered list of *parts* (the unit of output and of resuming) made of
*items* (one image each). The order is deterministic, so ``--shard i/N`` (parts ``p`` with
``p % N == i``) gives N disjoint slices that together cover the input, on any machine:

- a folder: :func:`itae_export.images.scan_images` order, cut into parts of ``part_size`` images;
  the key of an image is its relative POSIX path;
- a list file (``.txt``/``.lst``: one path a line, ``#`` comments; ``.csv`` with a header;
  ``.parquet``): the column ``path`` (or ``filepath``, ``file``, ``image``, ``url``; else the first
  column), in the list's order, cut into parts; relative paths are relative to the list's folder;
  the key is the path as written;
- WebDataset tar shards as img2dataset writes them (``00000.tar`` holding ``000000000.jpg``,
  ``000000000.json``, ...): a ``.tar`` file, a folder holding ``*.tar``, or a brace pattern
  ``shards/{00000..00099}.tar``; one part per tar, so a worker indexes only its own tars; the key
  is ``<tar name>/<sample key>``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from itae_export.errors import InputError, MissingDependencyError
from itae_export.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageDecodeError, decode_bytes, decode_image, scan_images

KINDS = ("auto", "folder", "list", "webdataset")
LIST_SUFFIXES = (".txt", ".lst", ".csv", ".parquet")
PATH_COLUMNS = ("path", "filepath", "file", "image", "image_path", "url")
DEFAULT_PART_SIZE = 10_000
# Image formats cameras and phones write that a Pillow may lack a plugin for (HEIC/HEIF, AVIF, JPEG XL,
# JPEG 2000, raw): a folder scan takes them too, so each one is counted and, where it cannot be
# decoded, listed in skipped.csv with the reason (never silently left out).
OTHER_IMAGE_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".dng", ".cr2", ".nef",
                                    ".arw"})
SCAN_EXTENSIONS = IMAGE_EXTENSIONS | OTHER_IMAGE_EXTENSIONS


@dataclass(frozen=True, slots=True)
class Item:
    """One image: ``key`` names it in the outputs; the bytes are ``path`` (whole file) or, for a tar
    member, ``length`` bytes from ``offset``."""

    pos: int  # position inside its part
    key: str
    path: str
    offset: int = -1
    length: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset >= 0:
                f.seek(self.offset)
                return f.read(self.length)
            return f.read()

    def decode(self, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        """(RGB PIL image, notes); raises :class:`~itae_export.images.ImageDecodeError`."""
        if self.offset < 0:
            return decode_image(self.path, max_pixels)
        try:
            data = self.read()
        except OSError as e:
            raise ImageDecodeError(self.key, f"cannot read: {e.strerror or e}") from None
        return decode_bytes(data, self.key, max_pixels)


@dataclass(frozen=True)
class Part:
    """One output file's worth of items: a slice of a list, or one tar."""

    id: int
    source: str  # what it covers, for the manifest: "items 0-9999" or the tar's name
    n_items: int | None  # None for a tar not indexed yet
    _items: tuple[Item, ...] | None = None
    _tar: str | None = None

    def items(self) -> list[Item]:
        if self._items is not None:
            return list(self._items)
        return index_tar(self._tar)


@dataclass
class Source:
    """A resolved input: its kind, its location, its parts, and a fingerprint of its layout."""

    kind: str
    location: str
    parts: list[Part]
    fingerprint: str

    @property
    def n_items(self) -> int | None:
        counts = [p.n_items for p in self.parts]
        return None if any(c is None for c in counts) else sum(counts)

    def describe(self) -> dict:
        return {"kind": self.kind, "location": self.location, "fingerprint": self.fingerprint,
                "n_parts": len(self.parts), "n_items": self.n_items}


def parse_shard(value: str | None) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N; None -> (0, 1)."""
    if value is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise InputError(f"--shard: {value!r} must be i/N with 0 <= i < N (e.g. 0/8)")
    return int(m.group(1)), int(m.group(2))


def shard_parts(parts: list[Part], shard: tuple[int, int]) -> list[Part]:
    """The parts of worker ``i`` of ``N``: every N-th part from the i-th (round robin, so the
    workers get parts of all regions of the input and similar amounts of work)."""
    i, n = shard
    return [p for p in parts if p.id % n == i]


def open_source(spec: str | os.PathLike, kind: str = "auto", part_size: int = DEFAULT_PART_SIZE,
                exclude: Path | None = None) -> Source:
    """Resolve an input into its parts. ``exclude``: a folder (the output) never scanned."""
    if kind not in KINDS:
        raise InputError(f"--input-format: {kind!r} is not one of {', '.join(KINDS)}")
    if isinstance(part_size, bool) or not isinstance(part_size, int) or part_size < 1:
        raise InputError(f"--part-size: {part_size!r} must be an integer >= 1")
    text = str(spec)
    p = Path(text)
    if kind == "auto":
        kind = _detect(p, text)
    if kind == "webdataset":
        return _webdataset(p, text)
    if kind == "list":
        keys, paths = read_path_list(p)
    else:
        if not p.is_dir():
            raise InputError(f"{p}: not a folder" if p.exists() else f"{p}: no such folder")
        root = Path(os.path.abspath(p))
        found = scan_images(root, SCAN_EXTENSIONS)
        if exclude is not None:
            ex = Path(exclude).resolve()
            found = [f for f in found if ex != f.resolve().parent and ex not in f.resolve().parents]
        keys = [f.relative_to(root).as_posix() for f in found]
        paths = [str(f) for f in found]
    if not keys:
        raise InputError(f"{text}: no images found")
    parts = []
    for pid, start in enumerate(range(0, len(keys), part_size)):
        stop = min(start + part_size, len(keys))
        items = tuple(Item(j - start, keys[j], paths[j]) for j in range(start, stop))
        parts.append(Part(pid, f"items {start}-{stop - 1}", stop - start, _items=items))
    return Source(kind, str(Path(os.path.abspath(p))), parts, _digest(["part_size", str(part_size), *keys]))


def _detect(p: Path, text: str) -> str:
    if "{" in text and ".." in text:
        return "webdataset"
    if p.is_file():
        if p.suffix.lower() == ".tar":
            return "webdataset"
        if p.suffix.lower() in LIST_SUFFIXES:
            return "list"
        raise InputError(f"{p}: not a folder, a .tar shard or a list of paths ({', '.join(LIST_SUFFIXES)})")
    if p.is_dir():
        if any(e.name.endswith(".tar") and e.is_file() for e in os.scandir(p)):
            return "webdataset"
        return "folder"
    raise InputError(f"{p}: no such file or folder")


# ---------------------------------------------------------------- lists of paths


def read_path_list(p: Path) -> tuple[list[str], list[str]]:
    """(keys as written, absolute paths) of a .txt/.lst/.csv/.parquet list; duplicates are an error."""
    if not p.is_file():
        raise InputError(f"{p}: no such list file")
    suffix = p.suffix.lower()
    if suffix in (".txt", ".lst"):
        keys = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="surrogateescape").splitlines()]
        keys = [k for k in keys if k and not k.startswith("#")]
    elif suffix == ".csv":
        import csv

        with open(p, newline="", encoding="utf-8", errors="surrogateescape") as f:  # names are bytes
            rows = list(csv.reader(f))
        if not rows:
            raise InputError(f"{p}: empty CSV (a header row naming a 'path' column is expected)")
        header = [h.strip().lower() for h in rows[0]]
        col = next((header.index(c) for c in PATH_COLUMNS if c in header), 0)
        keys = [r[col].strip() for r in rows[1:] if len(r) > col and r[col].strip()]
    elif suffix == ".parquet":
        pq = require_pyarrow("a .parquet list of paths")[1]
        try:
            schema = pq.read_schema(p)
        except Exception as e:  # noqa: BLE001 - pyarrow's error types vary
            raise InputError(f"{p}: not a readable parquet file ({e})") from None
        names = [n.lower() for n in schema.names]
        col = schema.names[next((names.index(c) for c in PATH_COLUMNS if c in names), 0)]
        keys = [str(k) for k in pq.read_table(p, columns=[col]).column(col).to_pylist() if k]
    else:
        raise InputError(f"{p}: a list of paths must end with {', '.join(LIST_SUFFIXES)}")
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            raise InputError(f"{p}: {k!r} is listed twice")
        seen.add(k)
    base = Path(os.path.abspath(p)).parent
    return keys, [k if os.path.isabs(k) else str(base / k) for k in keys]


# ---------------------------------------------------------------- WebDataset tars


def expand_braces(pattern: str) -> list[str]:
    """``a/{000..012}.tar`` -> the 13 names (zero padding kept); nested or several ranges work too."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():]))
    return out


def _webdataset(p: Path, text: str) -> Source:
    if "{" in text:
        tars = [Path(t) for t in expand_braces(text)]
        missing = [t for t in tars if not t.is_file()]
        if missing:
            raise InputError(f"{text}: {len(missing)} of {len(tars)} tar shards are missing (e.g. {missing[0]})")
    elif p.is_file():
        tars = [p]
    elif p.is_dir():
        tars = sorted((Path(e.path) for e in os.scandir(p) if e.name.endswith(".tar") and e.is_file()),
                      key=lambda t: t.name)
    else:
        raise InputError(f"{p}: no such file or folder")
    if not tars:
        raise InputError(f"{text}: no .tar shards found")
    names = [t.name for t in tars]
    if len(set(names)) != len(names):
        raise InputError(f"{text}: two tar shards share a file name")
    tars = [Path(os.path.abspath(t)) for t in tars]
    parts = [Part(i, t.name, None, _tar=str(t)) for i, t in enumerate(tars)]
    sizes = [f"{t.name}:{t.stat().st_size}" for t in tars]
    return Source("webdataset", text if "{" in text else str(Path(os.path.abspath(p))), parts, _digest(sizes))


def index_tar(path: str) -> list[Item]:
    """The image members of one WebDataset tar, in tar order: one per sample (the first member with
    an image extension); the key is ``<tar name>/<sample key>``. Reads headers only."""
    import tarfile

    tar_name = Path(path).name
    items: list[Item] = []
    seen: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                if base.startswith("."):
                    continue
                dot = base.find(".")
                if dot <= 0 or os.path.splitext(base)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                sample = m.name[: len(m.name) - len(base) + dot]
                if sample in seen:
                    continue  # a second image of the same sample (e.g. .jpg and .png)
                seen.add(sample)
                items.append(Item(len(items), f"{tar_name}/{sample}", path, m.offset_data, m.size))
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"{path}: not a readable uncompressed tar ({e})") from None
    return items


def require_pyarrow(what: str):
    """(pyarrow, pyarrow.parquet), or a clear error naming the extra to install."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError(f"{what} needs pyarrow: pip install 'itae-export[scale]'") from None
    return pa, pq


def _digest(parts: list[str]) -> str:
    h = hashlib.sha256()
    for s in parts:
        h.update(s.encode("utf-8", "surrogateescape") + b"\0")
    return "sha256:" + h.hexdigest()
