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

Every input has an outcome: an item is either an image to embed or carries ``skip``, the reason it
cannot be (an empty list row, a link or device member, a member the file ends inside, a tar cut
short, ...). Such items go through the embed stage like the others and land in the part's skipped
record, so a part's vectors plus its skipped lines always add up to its items.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from itae_export.data.outputs import uncell
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
MAX_MEMBER_BYTES = 1 << 30  # a tar member is read whole into memory before decoding


def text_key(key: str) -> str:
    """A key as UTF-8 text (parquet strings, the shard resume record): a name that is not valid UTF-8
    keeps its valid part, each other byte written as ``\\xNN``. CSV files keep the bytes themselves."""
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        return os.fsencode(key).decode("utf-8", "backslashreplace")


def unique_keys(keys: list[str], skips: list[str | None]) -> list[str]:
    """``keys`` with every key unique: a skipped item whose key is taken (a symlink member ``q`` beside
    the sample ``q.png``, a third copy of a member, a list path spelled like an empty row's
    ``list.txt:row 2``) gets `` (2)``, `` (3)``, ... The items to embed keep their keys, unique already.
    Two items of one key made the embed stage count a row twice and never write the part."""
    taken = {k for k, why in zip(keys, skips) if why is None}
    out = []
    for k, why in zip(keys, skips):
        if why is not None:
            base, n = k, 1
            while k in taken:
                n += 1
                k = f"{base} ({n})"
            taken.add(k)
        out.append(k)
    return out


@dataclass(frozen=True, slots=True)
class Item:
    """One image: ``key`` names it in the outputs; the bytes are ``path`` (whole file) or, for a tar
    member, ``length`` bytes from ``offset``."""

    pos: int  # position inside its part
    key: str
    path: str
    offset: int = -1
    length: int = -1
    skip: str | None = None  # why this member or row cannot be embedded (it still has a row: a skipped one)

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset >= 0:
                f.seek(self.offset)
                return f.read(self.length)
            return f.read()

    def decode(self, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        """(RGB PIL image, notes); raises :class:`~itae_export.images.ImageDecodeError`."""
        if self.skip is not None:
            raise ImageDecodeError(self.key, self.skip)
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
    stamp: str | None = None  # a tar's size when the input was opened: a part written from another size is stale

    def items(self) -> list[Item]:
        """Every item of the part, the ones that cannot be embedded included (with ``skip`` set)."""
        if self._items is not None:
            return list(self._items)
        return list(index_tar(self._tar).items)

    def unaccounted(self) -> str | None:
        """Why members of this part cannot all be accounted for (a tar cut short or corrupt), or None."""
        return None if self._tar is None else index_tar(self._tar).lost


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
    reasons: list[str | None] = []
    if kind == "list":
        keys, paths, reasons = read_path_list(p)
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
    if not keys or (reasons and all(r is not None for r in reasons)):
        raise InputError(f"{text}: no images found")
    if reasons:
        keys = unique_keys(keys, reasons)
    parts = []
    for pid, start in enumerate(range(0, len(keys), part_size)):
        stop = min(start + part_size, len(keys))
        items = tuple(Item(j - start, keys[j], paths[j], skip=reasons[j] if reasons else None)
                      for j in range(start, stop))
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


def read_path_list(p: Path) -> tuple[list[str], list[str], list[str | None]]:
    """(keys, absolute paths, skip reasons) of a .txt/.lst/.csv/.parquet list, one entry per row.

    A row without a path (an empty line or cell before the last path, a parquet null) keeps its place with the key
    ``<list name>:row <n>`` (n counts from 1, after a .csv's header) and a skip reason, so every row
    of the list has an outcome. A file listed twice (``a.png``, ``./a.png``, its absolute path) is an error."""
    if not p.is_file():
        raise InputError(f"{p}: no such list file")
    suffix = p.suffix.lower()
    if suffix in (".txt", ".lst"):
        # utf-8-sig: the BOM Windows tools write is not part of the first path
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8-sig", errors="surrogateescape").splitlines()]
        raw = [k for k in lines if not k.startswith("#")]  # names are bytes: any file name is listed
    elif suffix == ".csv":
        import csv

        try:
            with open(p, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:  # names are bytes; no BOM
                rows = list(csv.reader(f))
        except csv.Error as e:
            raise InputError(f"{p}: not a readable CSV ({e})") from None
        if not rows:
            raise InputError(f"{p}: empty CSV (a header row naming a 'path' column is expected)")
        header = [h.strip().lower() for h in rows[0]]
        col = next((header.index(c) for c in PATH_COLUMNS if c in header), 0)
        raw = [uncell(r[col].strip()) if len(r) > col else "" for r in rows[1:]]  # e.g. an assignments.csv
    elif suffix == ".parquet":
        pq = require_pyarrow("a .parquet list of paths")[1]
        try:
            schema = pq.read_schema(p)
            names = [n.lower() for n in schema.names]
            col = schema.names[next((names.index(c) for c in PATH_COLUMNS if c in names), 0)]
            column = pq.read_table(p, columns=[col]).column(col)
        except Exception as e:  # noqa: BLE001 - pyarrow's error types vary
            raise InputError(f"{p}: not a readable parquet file ({e})") from None
        pa = require_pyarrow("a .parquet list of paths")[0]
        kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
                or pa.types.is_large_binary(kind)):
            raise InputError(f"{p}: column {col!r} holds {kind}, not paths (name the column of paths 'path')")
        # binary paths are a file name's bytes (any name, UTF-8 or not), as os.fsdecode gives them
        raw = [None if k is None else (os.fsdecode(k) if isinstance(k, bytes) else str(k)).strip()
               for k in column.to_pylist()]
    else:
        raise InputError(f"{p}: a list of paths must end with {', '.join(LIST_SUFFIXES)}")
    if suffix != ".parquet":
        while raw and not raw[-1]:
            raw.pop()  # blank lines at the end of a text file are layout, not rows
    keys, reasons = [], []
    base = Path(os.path.abspath(p)).parent
    seen: dict[str, str] = {}  # the file a row points at (``a.png``, ``./a.png``, its absolute path: one file) -> row
    for n, k in enumerate(raw, 1):
        if not k:
            keys.append(f"{p.name}:row {n}")
            reasons.append("a null value in the list, not a path" if k is None
                           else "an empty row in the list, not a path")
            continue
        target = os.path.normpath(os.path.join(base, k))
        if target in seen:
            also = "" if seen[target] == k else f" (also as {seen[target]!r})"
            raise InputError(f"{p}: {k!r} is listed twice{also}")
        seen[target] = k
        keys.append(k)
        reasons.append(None)
    return keys, [k if os.path.isabs(k) else str(base / k) for k in keys], reasons


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


MAX_BRACE_NAMES = 1_000_000  # LAION-5B is about 240,000 tars of 10,000 images


def brace_count(pattern: str) -> int:
    """How many names :func:`expand_braces` makes of ``pattern``, computed without making them."""
    n = 1
    for lo, hi in re.findall(r"\{(\d+)\.\.(\d+)\}", pattern):
        n *= max(0, int(hi) - int(lo) + 1)
    return n


def _webdataset(p: Path, text: str) -> Source:
    if "{" in text:
        if brace_count(text) > MAX_BRACE_NAMES:  # 10**11 names were built (a MemoryError, or no end) before any check
            raise InputError(f"{text}: names {brace_count(text)} tar shards, more than {MAX_BRACE_NAMES:,}; "
                             "check the ranges")
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
    # the plan depends on the tars' names only: a tar fetched again (a cut download replaced) keeps the
    # shard directory; its part, written from the old bytes, is stale (its stamp differs) and redone
    parts = [Part(i, t.name, None, _tar=str(t), stamp=f"size={t.stat().st_size}") for i, t in enumerate(tars)]
    return Source("webdataset", text if "{" in text else str(Path(os.path.abspath(p))), parts,
                  _digest(["webdataset", *names]))


@dataclass(frozen=True)
class TarIndex:
    """What one tar holds: an item for every sample with an image and a skipped item (``skip`` set)
    for every member or sample that cannot be embedded; ``lost``: why members after some point
    cannot be known (the tar is cut short or corrupt there), or None when the tar ends properly."""

    items: tuple[Item, ...]
    lost: str | None
    n_members: int


_SPECIAL = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
            tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}


def index_tar(path: str) -> TarIndex:
    """Every member of one WebDataset tar accounted for, in tar order: a sample (members sharing the
    name up to the first dot of the file name) is embedded from its first image member, and its
    other members (``.json``, ``.txt``, ...) go with it; links, devices, FIFOs, hidden files, a second
    image of a sample, a member whose name repeats, a member the file ends inside and a sample with
    no image each get a skipped item with the reason. Reads headers only (cached for the last tars).
    A file that is not a tar is one skipped item (key: the tar's name), not an error: the other tars
    of the shard go on."""
    try:
        st = os.stat(path)
    except OSError as e:  # gone or unreadable since the input was opened: one record, not a traceback
        reason = f"cannot read the tar ({e.strerror or e}): none of its members can be read"
        return TarIndex((Item(0, Path(path).name, str(path), skip=reason),), reason, 0)
    return _index_tar(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _index_tar(path: str, size: int, mtime_ns: int) -> TarIndex:
    tar_name = Path(path).name
    records: list[tuple[str, str | None, int, int]] = []  # (key, skip reason, offset, length), tar order
    images: dict[str, str] = {}  # sample -> its embedded member's name
    others: dict[str, list[str]] = {}  # sample -> its other members, in order
    names: dict[str, int] = {}  # member name -> offset of its first copy
    lost = None
    n_members = n_dirs = 0
    try:
        tf = tarfile.open(path, "r:")
    except Exception as e:  # noqa: BLE001 - a hostile header must end in a reason, never a traceback
        reason = f"not a readable uncompressed tar ({e}): none of its members can be read"
        return TarIndex((Item(0, tar_name, path, skip=reason),), reason, 0)
    with tf:
        try:
            for m in tf:
                n_members += 1
                key = f"{tar_name}/{m.name}"
                if m.isdir():
                    n_dirs += 1  # structure, not data
                    continue
                if m.type in _SPECIAL or not m.isfile():
                    what = _SPECIAL.get(m.type, f"a member of tar type {m.type!r}")
                    to = f" to {m.linkname!r}" if m.issym() or m.islnk() else ""
                    records.append((key, f"{what}{to}, not an image file: not followed", -1, -1))
                    continue
                if m.issparse():
                    records.append((key, "a sparse member (its bytes are not stored whole), not an image file",
                                    -1, -1))
                    continue
                if m.name in names:
                    records.append((key, f"a second member of this name (at byte {m.offset}; the first, at byte "
                                         f"{names[m.name]}, is used)", -1, -1))
                    continue
                names[m.name] = m.offset
                base = m.name.rsplit("/", 1)[-1]
                if base.startswith("."):
                    records.append((key, "a hidden file (a leading dot), not a sample", -1, -1))
                    continue
                dot = base.find(".")
                sample = m.name[: len(m.name) - len(base) + dot] if dot > 0 else m.name
                if dot > 0 and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS:
                    if sample in images:
                        records.append((key, f"a second image of sample {sample!r} ({images[sample]} is embedded)",
                                        -1, -1))
                        continue
                    images[sample] = base
                    if m.size > MAX_MEMBER_BYTES:
                        records.append((f"{tar_name}/{sample}", f"{m.size} bytes, above the {MAX_MEMBER_BYTES >> 20} "
                                        "MiB an image member may hold: not read into memory", -1, -1))
                    elif m.offset_data + m.size > size:
                        have = max(0, size - m.offset_data)
                        records.append((f"{tar_name}/{sample}", f"the tar ends inside this member ({have} of its "
                                        f"{m.size} bytes are there): a partial download or copy?", -1, -1))
                    else:
                        records.append((f"{tar_name}/{sample}", None, m.offset_data, m.size))
                else:
                    others.setdefault(sample, []).append(base)
        except Exception as e:  # noqa: BLE001 - as above: TarError, OSError, or a header tarfile chokes on
            lost = (f"the file ends at byte {size}, before the tar's end-of-archive marker" if tf.offset >= size
                    else f"unreadable from byte {tf.offset} of {size} ({e})")
        if lost is None:
            lost = _end_of_archive(path, tf.offset, size)
    n_others = sum(len(v) for v in others.values())
    if n_dirs + len(records) + n_others != n_members:  # every member once: a count that does not add up is an error
        raise InputError(f"{path}: {n_members} members, but {n_dirs} folders + {len(records)} records + {n_others} "
                         "sample members were accounted for")
    for sample, members in others.items():
        if sample not in images:
            records.append((f"{tar_name}/{sample}", f"no image in this sample (members: {', '.join(members)})", -1, -1))
    if lost is not None:  # img2dataset's <stem>.parquet lists the samples the tar held: name the lost ones
        found = set(images) | set(others)
        records.extend((f"{tar_name}/{k}", f"listed in {Path(path).stem}.parquet but lost with the end of the tar",
                        -1, -1) for k in _listed_samples(path) if k not in found)
    keys = unique_keys([r[0] for r in records], [r[1] for r in records])
    items = [Item(i, key, path, off, length, skip) for i, (key, (_, skip, off, length)) in
             enumerate(zip(keys, records))]
    if lost is not None:
        last = next(reversed(names), None)
        lost = (f"{lost}: members after {last!r} are lost" if last else f"{lost}: no member could be read") + \
            " (a partial download or copy?)"
        items.append(Item(len(items), tar_name, path, skip=lost))
    return TarIndex(tuple(items), lost, n_members)


def _listed_samples(tar_path: str) -> list[str]:
    """The keys img2dataset lists as downloaded (status "success") in the parquet beside a tar
    (``00000.tar`` -> ``00000.parquet``); [] when there is none or it cannot be read."""
    meta = Path(tar_path).with_suffix(".parquet")
    if not meta.is_file():
        return []
    try:
        import pyarrow.parquet as pq

        t = pq.read_table(meta, columns=["key", "status"])
        return [str(k) for k, st in zip(t.column("key").to_pylist(), t.column("status").to_pylist())
                if k is not None and st == "success"]
    except Exception:  # noqa: BLE001 - not img2dataset's file, or pyarrow missing: nothing to compare
        return []


def _end_of_archive(path: str, at: int, size: int) -> str | None:
    """None when a zero block (the end-of-archive marker) follows the last member at byte ``at``;
    else what is there instead."""
    with open(path, "rb") as f:
        f.seek(at)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        return f"the file ends at byte {size}, before the tar's end-of-archive marker"
    if block.strip(b"\0"):
        return f"a corrupt member header at byte {at} of {size}"
    return None


def require_pyarrow(what: str):
    """(pyarrow, pyarrow.parquet), or a clear error naming the extra to install."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError(f"{what} needs pyarrow: pip install -e '.[scale]' in the itae-export clone") from None
    return pa, pq


def _digest(parts: list[str]) -> str:
    h = hashlib.sha256()
    for s in parts:
        h.update(s.encode("utf-8", "surrogateescape") + b"\0")
    return "sha256:" + h.hexdigest()
