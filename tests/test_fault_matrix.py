"""The fault suite over the commands (issue 21): one table of cases, each run against every command it
applies to. A case sets the fault up and says what every command must do about it; a command says
how it is called. Not a copy per command: a new command joins every case by one line in COMMANDS.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from conftest import mount_tmpfs
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("pyarrow", reason="itae-embed needs the [scale] extra")

from itae_export.cli.cluster import main as cluster_cli  # noqa: E402
from itae_export.cli.embed import main as embed_cli  # noqa: E402
from itae_export.cli.inspect import main as inspect_cli  # noqa: E402
from itae_export.data.store import default_store_path  # noqa: E402

BAD = os.fsdecode(b"latin1-\xe9t\xe9.png")  # not valid UTF-8: names are bytes on Linux
N = 24


# ---------------------------------------------------------------- the commands


@dataclass
class Command:
    name: str
    args: Callable[[Path, Path, Path], tuple]  # (input, out, model) -> (click command, argv)
    module: str  # ``python -m`` form, for the kill cases
    reads_images: bool = True
    uses_cache: bool = True  # reads and fills the shared embedding cache


COMMANDS = [
    Command("itae-cluster", lambda src, out, m: (cluster_cli, [src, "--k", 2, "--onnx", m, "--out", out,
                                                               "--workers", 1, "--batch-size", 4]),
            "itae_export.cli.cluster"),
    Command("itae-embed run", lambda src, out, m: (embed_cli, ["run", src, "--out", out, "--onnx", m,
                                                               "--workers", 1, "--batch-size", 4, "--part-size", 8]),
            "itae_export.cli.embed"),
    Command("itae-embed cluster", lambda src, out, m: (embed_cli, ["cluster", src, "--k", 2, "--out", out]),
            "itae_export.cli.embed", reads_images=False),
    Command("itae-embed run --engine ray", lambda src, out, m: (embed_cli, ["run", src, "--out", out, "--onnx", m,
                                                                            "--engine", "ray", "--batch-size", 4]),
            "itae_export.cli.embed"),
    # the norms come from the PyTorch model of a registry name, not from the exported graph
    Command("itae-inspect", lambda src, out, m: (inspect_cli, [src, "--model", "vits14", "--random-weights",
                                                               "--out", out, "--batch-size", 8]),
            "itae_export.cli.inspect", uses_cache=False),
]
RAY = "itae-embed run --engine ray"


def _invoke(cmd: Command, src, out, model):
    click_cmd, argv = cmd.args(src, out, model)
    return CliRunner().invoke(click_cmd, [str(a) for a in argv])


def _one_line_error(res, *needles: str, forbid=("delete",)) -> str:
    assert res.exit_code == 1, (res.exit_code, res.output)
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit), \
        res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in errors[0], res.output
    for word in forbid:
        assert word not in errors[0], res.output
    return errors[0]


def _embedded(output: str) -> int:
    """The number of images a command says it embedded (not reused): '..., 12 embedded, 4 reused'."""
    m = re.search(r"(\d+) embedded", output)
    assert m, output
    return int(m.group(1))


# ---------------------------------------------------------------- inputs


def _folder(root: Path, names=()) -> Path:
    rng = np.random.default_rng(0)
    for i in range(N):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "a" / name)
    return root


def _source(kind: str, tmp: Path, names=()) -> Path:
    root = _folder(tmp / "photos", names)
    rel = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    if kind == "folder":
        return root
    if kind == "list":
        lst = tmp / "list.txt"
        lst.write_bytes(b"\n".join(os.fsencode(f"photos/{r}") for r in rel) + b"\n")
        return lst
    tar = tmp / "photos.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT, errors="surrogateescape") as tf:
        for r in rel:
            tf.add(root / r, arcname=r)
    return tar


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tiny_model):
    """A complete shard directory, the input of itae-embed cluster."""
    tmp = tmp_path_factory.mktemp("matrix-shards")
    out = tmp / "shards"
    res = CliRunner().invoke(embed_cli, ["run", str(_folder(tmp / "photos")), "--out", str(out), "--onnx",
                                         str(tiny_model), "--quiet", "--workers", "1"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs (see conftest.mount_tmpfs), the size the matrix's cases were written for."""
    unmount = mount_tmpfs(tmp_path / "mnt", "4m")
    yield tmp_path / "mnt"
    unmount()


def _input(cmd: Command, tmp: Path, shard_dir: Path, kind: str = "folder", names=()) -> Path:
    return _source(kind, tmp, names) if cmd.reads_images else shard_dir


# ---------------------------------------------------------------- the cases


def case_non_utf8_name(kind):
    def run(cmd, tmp, model, shards, request):
        if cmd.name == RAY:
            pytest.importorskip("ray")
        src = _source(kind, tmp, [BAD])
        res = _invoke(cmd, src, tmp / "out", model)
        assert res.exit_code == 0 and "Traceback" not in res.output, res.output
        assert f"{N + 1} embedded" in res.output or f"{N + 1} images" in res.output, res.output
        if cmd.uses_cache:  # a second run embeds nothing: the name was stored and is found again
            again = _invoke(cmd, src, tmp / "out2", model)
            assert again.exit_code == 0, again.output
            assert f"0 embedded, {N + 1} reused" in again.output, again.output
    return run


def case_out_under_a_file(cmd, tmp, model, shards, request):
    (tmp / "file").write_text("x")
    res = _invoke(cmd, _input(cmd, tmp, shards), tmp / "file" / "out", model)
    _one_line_error(res, "file")


def case_out_read_only(cmd, tmp, model, shards, request):
    mnt = request.getfixturevalue("tmpfs")
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    res = _invoke(cmd, _input(cmd, tmp, shards), mnt / "out", model)
    _one_line_error(res, "read-only")


def case_out_in_proc(cmd, tmp, model, shards, request):
    res = _invoke(cmd, _input(cmd, tmp, shards), Path("/proc/itae-out"), model)
    _one_line_error(res, "/proc/itae-out")


def case_full_disk(cmd, tmp, model, shards, request):
    mnt = request.getfixturevalue("tmpfs")
    request.getfixturevalue("monkeypatch").setenv("ITAE_CACHE_DIR", str(mnt / "cache"))
    ballast = mnt / "ballast"
    st = os.statvfs(mnt)
    ballast.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 192 * 1024))  # ~192 KiB left: some batches fit, not all
    src = _source("folder", tmp) if cmd.reads_images else shards
    if cmd.reads_images:
        for i in range(N, 160):  # more images than fit
            Image.fromarray(np.full((40, 40, 3), i, np.uint8)).save(src / "a" / f"{i:03d}.png")
    res = _invoke(cmd, src, mnt / "out", model)
    _one_line_error(res, "disk is full")
    ballast.unlink()
    res = _invoke(cmd, src, mnt / "out", model)
    assert res.exit_code == 0, res.output
    if cmd.reads_images:
        assert _embedded(res.output) < 160, "the batches finished before the disk filled were embedded again"


def case_corrupt_cache(cmd, tmp, model, shards, request):
    src = _source("folder", tmp)
    assert _invoke(cmd, src, tmp / "out", model).exit_code == 0
    store = default_store_path()
    data = bytearray(store.read_bytes())
    data[100:4096] = os.urandom(4096 - 100)  # a corrupt first page
    for side in store.parent.glob("embeddings.sqlite-*"):
        side.unlink()
    store.write_bytes(bytes(data))
    res = _invoke(cmd, src, tmp / "out2", model)
    _one_line_error(res, "corrupt", str(store), forbid=())


def case_corrupt_resume_record(cmd, tmp, model, shards, request):
    if cmd.name == RAY:
        pytest.importorskip("ray")
    src = _source("folder", tmp)
    assert _invoke(cmd, src, tmp / "out", model).exit_code == 0
    written = sorted(p.name for p in (tmp / "out").glob("part-*.parquet"))
    record = next((tmp / "out" / "_state").glob("*.sqlite"))
    for side in record.parent.glob(record.name + "-*"):
        side.unlink()
    data = bytearray(record.read_bytes())
    data[100:4096] = os.urandom(4096 - 100)  # a corrupt first page
    record.write_bytes(bytes(data))
    res = _invoke(cmd, src, tmp / "out", model)
    line = _one_line_error(res, str(record), "part files written are kept", forbid=())
    assert "afresh" not in line
    record.rename(tmp / "record.bak")  # as the line says: the written parts are kept, nothing is embedded again
    res = _invoke(cmd, src, tmp / "out", model)
    assert res.exit_code == 0 and _embedded(res.output) == 0, res.output
    assert sorted(p.name for p in (tmp / "out").glob("part-*.parquet")) == written


def _cache_rows() -> int:
    path = default_store_path()
    if not path.exists():
        return 0
    try:
        db = sqlite3.connect(str(path), timeout=5)
        try:
            return db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0


def case_kill_and_resume(cmd, tmp, model, shards, request):
    root = _folder(tmp / "photos")
    for i in range(N, 200):
        Image.fromarray(np.full((40, 40, 3), i % 255, np.uint8)).save(root / "b" / f"{i:03d}.png")
    _, argv = cmd.args(root, tmp / "out", model)
    proc = subprocess.Popen([sys.executable, "-m", cmd.module, *[str(a) for a in argv], "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline and _cache_rows() < 12:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    committed = _cache_rows()
    assert 0 < committed < 200, committed
    res = _invoke(cmd, root, tmp / "out", model)
    assert res.exit_code == 0, res.output
    # only what no committed batch holds is embedded again (itae-embed: from the cache or its record)
    assert _embedded(res.output) == 200 - committed, (committed, res.output)


READERS = {"itae-cluster", "itae-embed run", RAY, "itae-inspect"}  # the commands that read images by name
CASES = [  # (name, run, the commands it applies to)
    ("non-UTF-8 name in a folder", case_non_utf8_name("folder"), READERS),
    ("non-UTF-8 name in a list", case_non_utf8_name("list"), READERS),
    ("non-UTF-8 tar member", case_non_utf8_name("tar"), READERS),
    ("--out under a file", case_out_under_a_file, {c.name for c in COMMANDS} - {RAY}),
    ("--out read-only", case_out_read_only, {c.name for c in COMMANDS} - {RAY}),
    ("--out in /proc", case_out_in_proc, {c.name for c in COMMANDS} - {RAY}),
    ("full disk", case_full_disk, {"itae-cluster", "itae-embed run"}),
    ("corrupt cache", case_corrupt_cache, {"itae-cluster", "itae-embed run", RAY}),
    ("corrupt resume record", case_corrupt_resume_record, {"itae-embed run", RAY}),
    ("kill and resume", case_kill_and_resume, {"itae-cluster", "itae-embed run"}),
]


@pytest.mark.parametrize("case,cmd", [pytest.param(run, cmd, id=f"{name} | {cmd.name}")
                                      for name, run, applies in CASES for cmd in COMMANDS if cmd.name in applies])
def test_fault(case, cmd, tiny_model, shard_dir, tmp_path, request):
    case(cmd, tmp_path, tiny_model, shard_dir, request)
