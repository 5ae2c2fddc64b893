"""Probes of the data path with hostile options and inputs: each test failed before its fix."""

import concurrent.futures as cf

import imagefolders as datasets
import pytest
from click.testing import CliRunner

from itae_export.cli.cluster import main as cluster_cli
from itae_export.cli.embed import main as embed_cli
from itae_export.runtime import available_cores


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes") / "photos"
    datasets.fashion_folder(root, per_class=1)  # 10 images
    return root


def _spy_resources(monkeypatch) -> dict:
    """Record the decode pools' sizes and ONNX Runtime's intra-op threads, the resources an option sizes."""
    import onnxruntime as ort

    seen = {"pools": [], "intra_op": []}
    real_session = ort.InferenceSession

    def session(model, so=None, *a, **kw):
        if so is not None:
            seen["intra_op"].append(so.intra_op_num_threads)
        return real_session(model, so, *a, **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)
    for name in ("ThreadPoolExecutor", "ProcessPoolExecutor"):
        real = getattr(cf, name)

        def pool(max_workers=None, *a, _real=real, _name=name, **kw):
            seen["pools"].append((_name, max_workers))
            return _real(max_workers, *a, **kw)

        monkeypatch.setattr(cf, name, pool)
    return seen


COMMANDS = {
    "itae-cluster (threads)": (cluster_cli, ["--k", "2", "--pool", "thread"]),
    "itae-cluster (processes)": (cluster_cli, ["--k", "2", "--pool", "process"]),
    "itae-embed run": (embed_cli, []),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_huge_threads_and_workers_are_capped_to_the_cores(photos, tiny_model, tmp_path, monkeypatch, command):
    """--threads 100000 made ONNX Runtime start 100000 threads (7.5 GB, no end in 2 minutes) in
    itae-embed run; --workers 100000 --pool process spawned a Python process per image."""
    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path / "cache"))
    seen = _spy_resources(monkeypatch)
    cli, extra = COMMANDS[command]
    argv = ([str(photos)] if cli is cluster_cli else ["run", str(photos)]) + [
        "--onnx", str(tiny_model), "--out", str(tmp_path / "out"), "--threads", "100000", "--workers", "100000",
        "--no-cache" if cli is embed_cli else "--quiet", *extra]
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 0, r.output
    cores = available_cores()
    assert seen["intra_op"] and max(seen["intra_op"]) <= cores, seen
    assert seen["pools"] and all(n <= 4 * cores for _, n in seen["pools"]), seen
    assert all(n <= cores for kind, n in seen["pools"] if kind == "ProcessPoolExecutor"), seen
    if cli is embed_cli:  # not --quiet: the lines saying so
        assert f"--threads 100000: this process may use {cores} cores" in r.output, r.output
        assert "--workers 100000: at most" in r.output, r.output


def _tar_with(path, members):
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, attrs in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for k, v in attrs.items():
                setattr(info, k, v)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return path


def test_a_skipped_member_named_like_a_sample_keeps_every_key_unique(photos, tiny_model, tmp_path, monkeypatch):
    """A symlink member ``q`` beside ``q.png`` (and a third copy of ``r.png``) gave two items the key
    ``00000.tar/q``: the part's row count went past its items, it was never written, and
    ``itae-embed run`` still said nothing and exited 0."""
    import tarfile

    from itae_export.data import shards as sh
    from itae_export.data.sources import index_tar

    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path / "cache"))
    png = sorted(photos.rglob("*.png"))
    t = _tar_with(tmp_path / "wds" / "00000.tar", [
        ("q.png", png[0].read_bytes(), {}), ("q", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
        ("r.png", png[1].read_bytes(), {}), ("r.png", png[2].read_bytes(), {}), ("r.png", png[3].read_bytes(), {}),
        ("s", b"", {"type": tarfile.SYMTYPE, "linkname": "x"}), ("s.json", b"{}", {})])
    keys = [it.key for it in index_tar(str(t)).items]
    assert len(keys) == len(set(keys)) == 7, keys
    out = tmp_path / "shards"
    r = CliRunner().invoke(embed_cli, ["run", str(t.parent), "--out", str(out), "--onnx", str(tiny_model), "-q"])
    assert r.exit_code == 0 and "1 parts written" in r.output, r.output
    s = sh.open_shards(out)
    assert sorted(s.keys()) == ["00000.tar/q", "00000.tar/r"]
    assert len(s.skipped()) == 5 and len({k for k, _ in s.skipped()} | set(s.keys())) == 7, s.skipped()


def test_a_list_path_named_like_an_empty_row_keeps_every_key_unique(photos, tiny_model, tmp_path, monkeypatch):
    """An empty row's key (``list.txt:row 2``) could equal a path of the list: the same lost part."""
    from itae_export.data import shards as sh

    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path / "cache"))
    png = sorted(photos.rglob("*.png"))
    lst = tmp_path / "list.txt"
    (tmp_path / "list.txt:row 2").write_bytes(png[0].read_bytes())
    lst.write_text(f"{png[1]}\n\nlist.txt:row 2\n")
    out = tmp_path / "shards"
    r = CliRunner().invoke(embed_cli, ["run", str(lst), "--out", str(out), "--onnx", str(tiny_model), "-q"])
    assert r.exit_code == 0 and "1 parts written" in r.output, r.output
    s = sh.open_shards(out)
    assert len(s.keys()) == 2 and len(s.skipped()) == 1 and s.skipped()[0][0] not in s.keys(), (s.keys(), s.skipped())


def _npy(a) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _rehash(out, name):
    import hashlib
    import json

    s = json.loads((out / "summary.json").read_text())
    s["outputs"][name]["sha256"] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    (out / "summary.json").write_text(json.dumps(s))


def _summary(**fields):
    def edit(out):
        import json

        s = json.loads((out / "summary.json").read_text())
        s.update(fields)
        (out / "summary.json").write_text(json.dumps(s))
    return edit


def _embeddings(change):
    def edit(out):
        import numpy as np

        e = np.load(out / "embeddings.npy")
        (out / "embeddings.npy").write_bytes(_npy(change(e.copy())))
        _rehash(out, "embeddings.npy")
    return edit


def _nan_row(e):
    e[1] = float("nan")
    return e


def _inf_row(e):
    e[1, 0] = float("inf")
    return e


def _dup_path(out):
    lines = (out / "assignments.csv").read_text().splitlines()
    lines[2] = lines[1]
    (out / "assignments.csv").write_text("\n".join(lines) + "\n")
    _rehash(out, "assignments.csv")


FORGED_COLLECTIONS = {
    "summary.json a list": (lambda out: (out / "summary.json").write_text("[1, 2]"), "summary.json"),
    "search/index.json a list": (lambda out: (out / "search").mkdir() or (out / "search" / "index.json")
                                 .write_text("[1]"), "index.json"),
    "folder a number": (_summary(folder=5), "'folder'"),
    "folder a list": (_summary(folder=["a"]), "'folder'"),
    "onnx a number": (_summary(onnx=5), "'onnx'"),
    "model_id a list": (_summary(model_id=[1]), "'model_id'"),
    "a NaN row": (_embeddings(_nan_row), "not finite"),
    "an inf value": (_embeddings(_inf_row), "not finite"),
    "zero columns": (_embeddings(lambda e: e[:, :0]), "embeddings.npy"),
    "a path twice": (_dup_path, "twice"),
}


@pytest.mark.parametrize("case", list(FORGED_COLLECTIONS))
def test_a_forged_collection_is_one_line_for_every_search_command(collection, tmp_path, case):
    """Each of these was a traceback, a misleading line about "the query's vector" or "the session", or
    (NaN rows, a path listed twice) results computed from the forgery."""
    import shutil

    from itae_export.cli.search import main as search_cli

    out = tmp_path / "out"
    shutil.copytree(collection, out, ignore=shutil.ignore_patterns("search"))
    edit, needle = FORGED_COLLECTIONS[case]
    edit(out)
    first = next(iter((out / "assignments.csv").read_text().splitlines()[1:])).split(",")[0]
    commands = [["query", str(out), "--like", first, "-k", "3"]]
    if "index.json" not in case:  # 'itae-search index' writes a new index.json whatever was there
        commands.append(["index", str(out)])
    for argv in commands:
        r = CliRunner().invoke(search_cli, argv)
        lines = [ln for ln in r.output.strip().splitlines() if not ln.startswith("building the search index")]
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:"), (argv[0], r.output)
        assert needle in lines[0] and "query's vector" not in lines[0], (argv[0], r.output)
