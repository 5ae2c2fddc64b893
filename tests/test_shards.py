"""The sharded embed stage: inputs, --shard i/N, per-part parquet files, manifest, resume after SIGKILL,
and the cluster stage reading a shard directory."""

import io
import json
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import imagefolders as datasets
import numpy as np
import pytest
from click.testing import CliRunner

pa = pytest.importorskip("pyarrow", reason="the sharded stages need the [scale] extra (pyarrow)")
pq = pytest.importorskip("pyarrow.parquet")

from itae_export.cli.embed import main as embed_cli  # noqa: E402
from itae_export.cluster import faiss_kmeans as fk  # noqa: E402
from itae_export.data.embed import embed_folder  # noqa: E402
from itae_export.cluster.job import kmeans_assign  # noqa: E402
from itae_export.cluster.shard_cluster import cluster_shards  # noqa: E402
from itae_export.data.shards import STATE_DIR, open_shards, part_name, read_manifest  # noqa: E402
from itae_export.data.sources import expand_braces, open_source, parse_shard, shard_parts  # noqa: E402
from itae_export.engines.local import embed_shards  # noqa: E402
from itae_export.errors import InputError  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards") / "photos"
    datasets.fashion_folder(root, per_class=12)  # 120 images
    return root


@pytest.fixture(scope="module")
def reference(photos, tiny_model):
    """The vectors of the existing itae-cluster path (embed_folder), in scan order."""
    res = embed_folder(photos, tiny_model, batch_size=4, progress=False)
    return dict(zip(res.paths, res.embeddings))


def _all_vectors(out):
    s = open_shards(out)
    return s.keys(), s.load_all()


def write_tars(photos: Path, root: Path, per_tar: int = 50) -> list[str]:
    """img2dataset's layout: NNNNN.tar with 000000000.jpg|png + .json + .txt per sample."""
    root.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in photos.rglob("*.png"))
    keys = []
    for t, s in enumerate(range(0, len(files), per_tar)):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tf:
            for i, f in enumerate(files[s:s + per_tar], start=s):
                for name, data in ((f"{i:09d}.png", f.read_bytes()),
                                   (f"{i:09d}.json", json.dumps({"key": f"{i:09d}", "src": f.name}).encode()),
                                   (f"{i:09d}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                keys.append((f"{t:05d}.tar/{i:09d}", f.relative_to(photos).as_posix()))
    return keys


def test_shard_option_and_braces():
    assert parse_shard("3/8") == (3, 8) and parse_shard(None) == (0, 1)
    for bad in ("8/8", "-1/4", "a/b", "1", "0/0"):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(bad)
    assert expand_braces("d/{08..11}.tar") == ["d/08.tar", "d/09.tar", "d/10.tar", "d/11.tar"]


def test_sources_and_slices(photos, tmp_path):
    folder = open_source(photos, part_size=25)
    keys = [it.key for p in folder.parts for it in p.items()]
    assert len(keys) == 120 and keys == sorted(keys) and [p.n_items for p in folder.parts] == [25] * 4 + [20]
    # --shard i/N: disjoint slices that cover every part, the same on every call
    for n in (1, 2, 3, 7):
        slices = [[p.id for p in shard_parts(folder.parts, (i, n))] for i in range(n)]
        assert sorted(sum(slices, [])) == list(range(5))
    # lists of paths: text (relative to the list's folder), CSV and parquet, in the list's order
    rel = keys[::-1][:30]
    (tmp_path / "l.txt").write_text("# a comment\n" + "\n".join(str(photos / r) for r in rel) + "\n\n")
    (tmp_path / "l.csv").write_text("label,path\n" + "".join(f"x,{photos / r}\n" for r in rel))
    pq.write_table(pa.table({"path": [str(photos / r) for r in rel]}), tmp_path / "l.parquet")
    for name in ("l.txt", "l.csv", "l.parquet"):
        src = open_source(tmp_path / name, part_size=100)
        assert src.kind == "list" and [it.path for it in src.parts[0].items()] == [str(photos / r) for r in rel]
    (tmp_path / "dup.txt").write_text(f"{photos / rel[0]}\n{photos / rel[0]}\n")
    with pytest.raises(InputError, match="listed twice"):
        open_source(tmp_path / "dup.txt")
    # WebDataset tars: a folder of tars, one tar, a brace pattern; one part per tar
    tar_keys = write_tars(photos, tmp_path / "wds")
    for spec in (tmp_path / "wds", f"{tmp_path}/wds/{{00000..00002}}.tar"):
        src = open_source(spec)
        assert src.kind == "webdataset" and len(src.parts) == 3
        assert [it.key for p in src.parts for it in p.items()] == [k for k, _ in tar_keys]
    item = open_source(tmp_path / "wds" / "00001.tar").parts[0].items()[3]
    assert item.read() == (photos / dict(tar_keys)[item.key]).read_bytes()
    with pytest.raises(InputError, match="missing"):
        open_source(f"{tmp_path}/wds/{{00000..00009}}.tar")


def test_parts_are_fixed_size_lists_and_match_the_local_path(photos, tiny_model, reference, tmp_path):
    """Two workers (--shard 0/2, 1/2) give the same files as the existing embed path, read back by plain
    pyarrow as fixed_size_list<float32>[D]; WebDataset tars of the same images give the same vectors."""
    out = tmp_path / "shards"
    for i in range(2):
        st = embed_shards(photos, out, tiny_model, shard=f"{i}/2", part_size=32, batch_size=4, progress=False)
        assert st.parts_total == st.parts_written == 2
    m = read_manifest(out)
    assert m["model"]["name"] == "tiny_dinov2_vits14" and m["model"]["id"].startswith("sha256:")
    assert [p["file"] for p in m["parts"]] == [part_name(i) for i in range(4)]
    schema = pq.read_schema(out / part_name(0))
    assert pa.types.is_fixed_size_list(schema.field("vector").type)
    assert schema.field("vector").type.list_size == 64 and schema.field("vector").type.value_type == pa.float32()
    keys, x = _all_vectors(out)
    assert keys == list(reference)
    np.testing.assert_allclose(x, np.stack(list(reference.values())), atol=1e-5, rtol=0)

    tar_keys = dict(write_tars(photos, tmp_path / "wds"))
    st = embed_shards(tmp_path / "wds", tmp_path / "wshards", tiny_model, batch_size=4, progress=False)
    assert st.parts_written == 3
    wkeys, wx = _all_vectors(tmp_path / "wshards")
    np.testing.assert_allclose(wx, np.stack([reference[tar_keys[k]] for k in wkeys]), atol=1e-5, rtol=0)

    # another model, or another input, never shares a shard directory
    with pytest.raises(InputError, match="another input"):
        embed_shards(tmp_path / "wds", out, tiny_model, progress=False)


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from itae_export.data import shards
    from itae_export.engines.local import embed_shards
    mode, after = sys.argv[1], int(sys.argv[2])
    if mode == "batches":       # SIGKILL after this many committed batches
        n = [0]
        def on_batch(stats):
            n[0] += 1
            if n[0] == after:
                os.kill(os.getpid(), signal.SIGKILL)
    else:                       # SIGKILL half-way through writing the next part file
        on_batch = None
        real = shards.atomic_write_bytes
        def torn(path, data):
            import tempfile
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
            os.write(fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        shards.atomic_write_bytes = torn
    embed_shards({photos!r}, {out!r}, {model!r}, part_size=16, batch_size=4, progress=False, on_batch=on_batch)
""")


def test_killed_run_resumes_with_only_the_missing_work(photos, tiny_model, reference, tmp_path, monkeypatch):
    """A subprocess SIGKILLed mid-part, then one SIGKILLed while writing a part file: the rerun embeds only
    the images that were in neither a part file nor the resume record, and the result equals a clean run."""
    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path / "cache"))  # an empty embedding cache: the record alone
    out = tmp_path / "shards"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(tests=str(TESTS), photos=str(photos), out=str(out), model=str(tiny_model)))

    def killed(*argv):
        p = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120)
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]

    # 120 images, parts of 16 (8 parts), batches of 4: killed after 7 batches = part 0 written, 12 rows of part 1
    killed("batches", "7")
    assert [f.name for f in out.glob("part-*.parquet")] == [part_name(0)]
    assert _state_rows(out) == 12
    # killed again while part 1's file is half written: no part-00001.parquet, only a torn temporary file
    killed("write", "0")
    assert [f.name for f in out.glob("part-*.parquet")] == [part_name(0)]
    assert len(list(out.glob(".part-00001.parquet.*.tmp"))) == 1 and _state_rows(out) == 16

    st = embed_shards(photos, out, tiny_model, part_size=16, batch_size=4, progress=False)
    assert (st.parts_done_before, st.rows_resumed, st.parts_written) == (1, 16, 7)
    assert st.embedded == 120 - 16 - 16  # only what was in neither a part file nor the resume record
    assert not list(out.glob(".*.tmp")) and _state_rows(out) == 0
    keys, x = _all_vectors(out)
    assert keys == list(reference)
    np.testing.assert_allclose(x, np.stack(list(reference.values())), atol=1e-5, rtol=0)
    again = embed_shards(photos, out, tiny_model, part_size=16, batch_size=4, progress=False)
    assert (again.embedded, again.parts_written, again.parts_done_before) == (0, 0, 8)


def _state_rows(out: Path) -> int:
    import sqlite3

    total = 0
    for f in (out / STATE_DIR).glob("*.sqlite"):
        db = sqlite3.connect(str(f))
        total += db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
        db.close()
    return total


def test_cluster_stage_from_shards(photos, tiny_model, reference, tmp_path):
    """Below the faiss threshold the cluster stage is kmeans_assign on the same vectors; with faiss it reads
    one part at a time and agrees with scikit-learn's K-Means on well-separated data."""
    out = tmp_path / "shards"
    embed_shards(photos, out, tiny_model, part_size=50, batch_size=8, progress=False)
    s = cluster_shards(out, 10, backend="auto", seed=0)
    assert s["kmeans"]["backend"] == "sklearn" and s["counts"]["embedded"] == 120
    t = pq.read_table(out / "clusters_k10" / "assignments.parquet")
    assert t.column("key").to_pylist() == list(reference)
    labels, dist, _ = kmeans_assign(np.stack(list(reference.values())), 10, seed=0)
    assert t.column("cluster").to_numpy().tolist() == labels.tolist()
    np.testing.assert_allclose(t.column("distance").to_numpy(), dist, atol=1e-5)
    pytest.importorskip("faiss", reason="faiss K-Means needs the [scale] extra (faiss-cpu)")
    s = cluster_shards(out, 10, out / "f", backend="faiss", sample_size=100, seed=0)
    assert s["kmeans"]["backend"] == "faiss" and s["kmeans"]["sample_size"] == 100
    assert sum(s["cluster_sizes"]) == 120


def test_faiss_kmeans_agrees_with_sklearn_on_separated_data():
    pytest.importorskip("faiss", reason="faiss K-Means needs the [scale] extra (faiss-cpu)")
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((12, 96)).astype(np.float32)
    y = rng.integers(0, 12, 6000)
    x = centres[y] * 3 + rng.standard_normal((6000, 96)).astype(np.float32)
    labels, dist, inertia = fk.faiss_kmeans_assign(x, 12, sample_size=2000, chunk=777)
    sk = KMeans(12, n_init=3, random_state=0).fit_predict(fk.normalize_rows(x))
    assert adjusted_rand_score(sk, labels) > 0.99 and adjusted_rand_score(y, labels) > 0.99
    # distances are those of unit vectors to unit centroids, assigned in chunks
    xn = fk.normalize_rows(x)
    model = fk.train(xn[:2000], 12)
    lab2, d2 = fk.assign([x[:3000], x[3000:]], model.centroids, chunk=500)
    np.testing.assert_allclose(d2, np.linalg.norm(xn - model.centroids[lab2], axis=1), atol=1e-4)
    assert kmeans_assign(np.tile(x, (4, 1))[: fk.FAISS_MIN_POINTS], 12)[0].shape == (fk.FAISS_MIN_POINTS,)


def test_cli(photos, tiny_model, tmp_path):
    out = tmp_path / "shards"
    r = CliRunner().invoke(embed_cli, ["run", str(photos), "--out", str(out), "--onnx", str(tiny_model),
                                       "--part-size", "60", "--shard", "1/2", "-q"])
    assert r.exit_code == 0, r.output
    assert "1 parts written" in r.output
    r = CliRunner().invoke(embed_cli, ["status", str(out)])
    assert r.exit_code == 1 and "missing parts: 0" in r.output
    r = CliRunner().invoke(embed_cli, ["cluster", str(out), "--k", "5"])
    assert r.exit_code == 1 and "1 of 2 parts are not written yet" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(embed_cli, ["run", str(photos), "--out", str(out), "--onnx", str(tiny_model),
                                       "--shard", "2/2"])
    assert r.exit_code == 2 and "--shard" in r.output
    r = CliRunner().invoke(embed_cli, ["run", str(photos), "--out", str(out), "--onnx", str(tiny_model),
                                       "--actors", "2"])
    assert r.exit_code == 2 and "--engine ray" in r.output


def test_kmeans_plus_plus_seedings_side_by_side():
    """The seedings run in one pass per step: each returns its own centres and their true potential,
    the kept one is the lowest, and it covers blobs far better than k random points (faiss's start)."""
    rng = np.random.default_rng(1)
    centres = fk.normalize_rows(rng.standard_normal((40, 64)).astype(np.float32))
    y = rng.integers(0, 40, 8000)
    xs = fk.normalize_rows(centres[y] + 0.05 * rng.standard_normal((8000, 64)).astype(np.float32))
    seeds, pot = fk._seed_many(xs, 40, np.random.default_rng(5), 2 + int(np.log(40)), 3)
    assert seeds.shape == (3, 40, 64) and pot.shape == (3,)
    for s_, p_ in zip(seeds, pot, strict=True):  # the potential is the sum of squared distances to the nearest seed
        d2 = np.maximum(2 - 2 * (xs @ s_.T), 0).min(axis=1)
        assert p_ == pytest.approx(d2.sum(), rel=1e-4)
    assert len({tuple(s_[1]) for s_ in seeds}) > 1  # three different seedings, not one thrice
    best = fk.kmeans_plus_plus(xs, 40, seed=0, seedings=3, max_points=8000)
    again, pots = fk._seed_many(xs, 40, np.random.default_rng(0), 2 + int(np.log(40)), 3)
    np.testing.assert_array_equal(best, again[int(np.argmin(pots))])
    covered = len(np.unique(np.argmax(best @ centres.T, axis=1)))
    random_pick = len(np.unique(y[np.random.default_rng(0).choice(8000, 40, replace=False)]))
    assert covered >= 38 > random_pick
    assert fk.seeding_points(10) == fk.MIN_SEED_POINTS and fk.seeding_points(1000) == fk.MAX_SEED_POINTS
    assert fk.seeding_points(200) == 200 * fk.SEED_POINTS_PER_CENTROID
