"""File primitives every reader and writer uses: atomic writes and content hashes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

from itae_export.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe_os_error(e: OSError) -> str:
    """A short reason for an OSError, with what to do about the common ones."""
    hint = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EEXIST: "a file of that name is in the way"}.get(e.errno)
    return hint or (e.strerror or str(e))


def ensure_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` as an existing folder (created if needed); OutputError in one line if that fails."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{what}: {path} exists and is not a folder") from None
    except OSError as e:
        raise OutputError(f"{what}: cannot create the folder {path} ({describe_os_error(e)})") from None
    return path


def check_writable(path: str | os.PathLike, what: str, *, folder: bool) -> None:
    """Check up front that ``path`` can be written (a folder with ``folder``, else a file): no part
    of it is a file, it is not the other kind already, and a file can be created in the nearest
    existing folder above it (tried with an empty hidden file, removed at once: permission bits
    alone pass /proc, /sys and some mounts for root). OutputError in one line naming ``what``."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise OutputError(f"{what}: {path} exists and is not a folder")
        if not folder and path.is_dir():
            raise OutputError(f"{what}: {path} is a folder, not a file name")
    probe = path if (folder and path.is_dir()) else path.parent
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise OutputError(f"{what}: {probe} is a broken link")
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{what}: {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            ro = os.statvfs(probe).f_flag & os.ST_RDONLY
        except OSError:
            ro = False
        why = "the filesystem is read-only" if ro else "permission denied"
        raise OutputError(f"{what}: cannot write in {probe} ({why})")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".itae-write-check.")
    except OSError as e:
        raise OutputError(f"{what}: {path}: cannot write in {probe} ({describe_os_error(e)})") from None
    os.close(fd)
    os.unlink(name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    The file gets the permissions a plain ``open`` would give it (0666 less the umask). Any OSError
    becomes an OutputError naming the path, and the temporary file is removed."""
    path = Path(path)
    ensure_dir(path.parent, "output folder")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise OutputError(f"{path}: cannot write ({describe_os_error(e)})") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Streamed sha256 (hex) of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_of_files(paths) -> str:
    """sha256 (hex) over ``name\\0sha256\\n`` of each file, in the order given."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{Path(p).name}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()
