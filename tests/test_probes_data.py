"""Probes of the data path with hostile options and inputs: each test failed before its fix."""

import concurrent.futures as cf
import os

import imagefolders as datasets
import numpy as np
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


def _sealed_with(tiny_model, dest, edit):
    """A copy of the tiny model whose embedded manifest is edited by ``edit``, its flat copies dropped,
    resealed (what anyone who can write the file can do: the digest is a checksum, not a signature)."""
    import json

    import onnx

    from itae_export.onnx.manifest import INTEGRITY_KEY, METADATA_KEY, reseal

    proto = onnx.load(str(tiny_model))
    manifest = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    edit(manifest)
    del proto.metadata_props[:]
    for key, value in ((METADATA_KEY, json.dumps(manifest)), (INTEGRITY_KEY, "")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    reseal(proto)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dest))
    return dest


def _resolution(hw):
    def edit(m):
        m["preprocessing"]["resolution"] = list(hw)
        m["inputs"][0]["shape"][2:] = list(hw)
    return edit


@pytest.mark.parametrize("hw", [(112, 112), (100000, 100000)])
@pytest.mark.parametrize("command", ["itae-cluster", "itae-embed run"])
def test_a_resolution_the_graph_does_not_take_is_refused_before_any_image_is_decoded(
        photos, tiny_model, tmp_path, monkeypatch, hw, command):
    """The manifest said 112 (or 100000: 120 GB a decoded image) for a graph that takes 56x56: every
    image was resized to it first (ONNX Runtime's "invalid dimensions" after decoding, or every image
    skipped as out of memory), instead of the session saying the graph and its manifest disagree.
    (``itae-search query --image`` refuses such a model earlier: its fingerprint holds the preprocessing,
    so it is not the collection's model.)"""

    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path / "cache"))
    model = _sealed_with(tiny_model, tmp_path / "m" / "model.onnx", _resolution(hw))
    monkeypatch.setattr("itae_export.data.embed.preprocess", lambda *a, **k: pytest.fail("an image was decoded"))
    cli, argv = {
        "itae-cluster": (cluster_cli, [str(photos), "--k", "2", "--quiet"]),
        "itae-embed run": (embed_cli, ["run", str(photos), "-q"]),
    }[command]
    r = CliRunner().invoke(cli, [*argv, "--onnx", str(model), "--out", str(tmp_path / "out")])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1 and "Traceback" not in r.output, r.output
    assert "does not match its manifest" in errors[0] and "pixel_values" in errors[0], r.output


@pytest.mark.parametrize("field,value", [("std", [1e-300, 1e-300, 1e-300]), ("mean", [1e39, 0.0, 0.0]),
                                         ("scale", 1e300)])
def test_preprocessing_numbers_are_checked_as_the_float32_they_are_used_as(tiny_model, tmp_path, field, value):
    """std 1e-300 passed '> 0' but is 0 in float32 (a divide-by-zero warning, every image skipped);
    a scale of 1e300 made every pixel inf."""
    from itae_export.errors import InputError
    from itae_export.onnx.manifest import read_manifest

    model = _sealed_with(tiny_model, tmp_path / "model.onnx",
                         lambda m: m["preprocessing"].__setitem__(field, value))
    with pytest.raises(InputError, match=f"preprocessing.{field}"):
        read_manifest(model)


def _lists(tmp_path, photos):
    """The same two images listed as Windows tools write lists: a UTF-8 BOM and CRLF lines; a parquet
    list whose paths are binary (bytes: any file name) or dictionary-encoded."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    a, b = (str(p.relative_to(tmp_path)) for p in sorted(photos.rglob("*.png"))[:2])
    (tmp_path / "bom.txt").write_bytes(f"\ufeff{a}\r\n{b}\r\n".encode())
    (tmp_path / "bom.csv").write_bytes(f"\ufeffpath,file\r\n{a},x\r\n{b},y\r\n".encode())
    pq.write_table(pa.table({"path": pa.array([a.encode(), b.encode()], pa.binary())}), tmp_path / "bin.parquet")
    pq.write_table(pa.table({"path": pa.array([a, b]).dictionary_encode()}), tmp_path / "dict.parquet")
    return [a, b]


@pytest.mark.parametrize("name", ["bom.txt", "bom.csv", "bin.parquet", "dict.parquet"])
def test_a_list_with_a_bom_or_binary_paths_reads_the_paths_as_written(photos, tmp_path, name):
    """A BOM became part of the first path (that image skipped as missing), a BOM'd 'path' header
    lost to the next known column, and binary parquet paths became "b'...'" (every image skipped)."""
    import shutil

    from itae_export.data.sources import read_path_list

    shutil.copytree(photos, tmp_path / "photos")
    want = _lists(tmp_path, tmp_path / "photos")
    keys, paths, reasons = read_path_list(tmp_path / name)
    assert keys == want and reasons == [None, None], keys
    assert all(os.path.isfile(p) for p in paths), paths


def test_a_parquet_list_without_a_text_column_is_one_line(tmp_path):
    """Without a path column the first column was taken even when it held numbers: every row then
    'embedded' a file named '1', '2', ... (all skipped as missing)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from itae_export.data.sources import read_path_list
    from itae_export.errors import InputError

    pq.write_table(pa.table({"id": [1, 2]}), tmp_path / "ids.parquet")
    with pytest.raises(InputError, match="'id' holds int64"):
        read_path_list(tmp_path / "ids.parquet")


@pytest.fixture(scope="module")
def shard_dir(photos, tiny_model, tmp_path_factory):
    from itae_export.engines.local import embed_shards

    out = tmp_path_factory.mktemp("probe-shards") / "shards"
    embed_shards(photos, out, tiny_model, progress=False, cache=False)
    return out


@pytest.mark.parametrize("seed", ["-5", str(2 ** 32), "99999999999999999999"])
@pytest.mark.parametrize("command", ["itae-cluster", "itae-embed cluster"])
def test_a_seed_kmeans_cannot_take_is_a_usage_error_before_any_work(photos, tiny_model, shard_dir, tmp_path,
                                                                     monkeypatch, seed, command):
    """sklearn takes 0..2**32-1 and faiss a C int: --seed -5 was a traceback after every image was embedded."""
    from itae_export.cluster import job

    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path / "cache"))
    cli, argv = {"itae-cluster": (cluster_cli, [str(photos), "--onnx", str(tiny_model), "--quiet"]),
                 "itae-embed cluster": (embed_cli, ["cluster", str(shard_dir), "-q"])}[command]
    r = CliRunner().invoke(cli, [*argv, "--k", "2", "--seed", seed, "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "--seed" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(job.OptionError, match="--seed"):
        job.ClusterOptions(k=2, seed=int(seed)).check()
    with pytest.raises(job.OptionError, match="--seed"):
        job.kmeans_assign(np.eye(4, dtype=np.float32), 2, seed=int(seed))


@pytest.mark.parametrize("second", ["./{a}", "{a_dir}//{a_name}", "{a_abs}", "{a_dir}/../{a_class}/{a_name}"])
def test_a_file_listed_twice_under_another_spelling_is_listed_twice(photos, tmp_path, second):
    """``a.png`` and ``./a.png`` (or the absolute path) were two images: the same vector twice in
    K-Means and the search results. The check compares the paths the rows point at."""
    import shutil

    from itae_export.data.sources import read_path_list
    from itae_export.errors import InputError

    shutil.copytree(photos, tmp_path / "photos")
    a = sorted((tmp_path / "photos").rglob("*.png"))[0]
    rel = a.relative_to(tmp_path)
    fields = {"a": rel.as_posix(), "a_dir": rel.parent.as_posix(), "a_name": rel.name, "a_abs": str(a),
              "a_class": rel.parent.name}
    (tmp_path / "l.txt").write_text(f"{rel.as_posix()}\n{second.format(**fields)}\n")
    with pytest.raises(InputError, match="listed twice"):
        read_path_list(tmp_path / "l.txt")


def test_the_collections_itae_embed_writes_are_searched(shard_dir, tmp_path):
    """The checks of a forged collection leave the real ones alone: a shard directory and an
    ``itae-embed cluster`` output (its summary names the shard directory, no embeddings.npy)."""
    from itae_export.cli.search import main as search_cli

    out = tmp_path / "clusters"
    r = CliRunner().invoke(embed_cli, ["cluster", str(shard_dir), "--k", "2", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    first = (out / "assignments.csv").read_text().splitlines()[1].split(",")[0]
    for collection in (shard_dir, out):
        r = CliRunner().invoke(search_cli, ["query", str(collection), "--like", first, "-k", "2"])
        assert r.exit_code == 0 and r.output.count("\n") >= 3, r.output


@pytest.mark.parametrize("pattern", ["{00000..99999999999}.tar", "{0..999}{0..999}{0..999}.tar"])
def test_a_brace_pattern_naming_too_many_tars_is_one_line_before_any_name_is_built(tmp_path, pattern):
    """``{00000..99999999999}.tar`` built 10**11 names: a MemoryError traceback after 4 GB (or no end)."""
    import time

    from itae_export.data.sources import open_source
    from itae_export.errors import InputError

    t0 = time.perf_counter()
    with pytest.raises(InputError, match="more than"):
        open_source(f"{tmp_path}/{pattern}")
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("command, option, value", [
    ("itae-cluster", "--batch-size", "4097"),  # the graph's batch axis ends at 4096 (onnx.contract.MAX_BATCH)
    ("itae-cluster", "--epochs", str(10 ** 9)),  # a head trained for 10**9 epochs never ends
    ("itae-embed run", "--batch-size", "4097"),
    ("itae-embed cluster", "--niter", str(10 ** 9)),  # faiss iterations
    ("itae-inspect", "--batch-size", "4097"),
])
def test_numeric_options_have_an_upper_bound(photos, tiny_model, shard_dir, tmp_path, monkeypatch, command, option,
                                             value):
    """An option whose value makes the run endless or the graph refuse is a usage error before any
    work: every count option has a cap, as --n-init has (issue 21)."""
    from itae_export.cli.inspect import main as inspect_cli

    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path / "cache"))
    out = str(tmp_path / "out")
    cli, argv = {"itae-cluster": (cluster_cli, [str(photos), "--onnx", str(tiny_model), "--k", "2", "--out", out]),
                 "itae-embed run": (embed_cli, ["run", str(photos), "--onnx", str(tiny_model), "--out", out]),
                 "itae-embed cluster": (embed_cli, ["cluster", str(shard_dir), "--k", "2", "--out", out]),
                 "itae-inspect": (inspect_cli, [str(photos), "--model", "dinov2_vits14", "--random-weights",
                                                "--out", out])}[command]
    r = CliRunner().invoke(cli, [*argv, option, value])
    assert r.exit_code == 2 and option in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_the_library_caps_epochs_and_batch_size_too():
    from itae_export.cluster import job

    with pytest.raises(job.OptionError, match="--epochs"):
        job.ClusterOptions(k=2, method="tsp", head_params={"epochs": 10 ** 9}).check()
    with pytest.raises(job.OptionError, match="--batch-size"):
        job.ClusterOptions(k=2, batch_size=10 ** 6).check()
