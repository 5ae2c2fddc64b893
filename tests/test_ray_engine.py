"""The Ray Data engine on a local Ray with a tiny model: the same files and vectors as the local engine,
sessions built in the actors, the starving-pool trap refused, a SIGKILLed Ray driver resumed."""

import signal
import subprocess
import sys
import textwrap

import imagefolders as datasets
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray engine needs the [ray] extra: pip install -e '.[ray]' in the itae-export clone")
pytest.importorskip("ray.data", reason="the Ray engine needs ray[data]")
pq = pytest.importorskip("pyarrow.parquet", reason="the Ray engine needs pyarrow")

from itae_export.cluster.shard_cluster import cluster_shards  # noqa: E402
from itae_export.data.shards import STATE_DIR, open_shards, read_manifest  # noqa: E402
from itae_export.engines.local import embed_shards  # noqa: E402
from itae_export.engines.ray_embed import check_resources, embed_shards_ray  # noqa: E402
from itae_export.errors import InputError  # noqa: E402

CPUS = 3  # one actor of 1 CPU, two CPUs left to the decode tasks


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray") / "photos"
    datasets.fashion_folder(root, per_class=8)  # 80 images
    return root


@pytest.fixture(scope="module")
def local_run(photos, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "local"
    embed_shards(photos, out, tiny_model, part_size=16, batch_size=8, progress=False)
    return out


def test_starving_actor_pool_is_refused():
    """A pool that takes every CPU would leave none to decode: refused before anything runs."""
    check_resources(3, 1, 2)
    for actors, cpus in ((1, 3), (3, 1), (2, 1.5)):
        with pytest.raises(InputError, match="starve"):
            check_resources(3, actors, cpus)


def test_ray_engine_equals_local_engine(local_ray, photos, tiny_model, local_run, tmp_path):
    out = tmp_path / "ray"
    with pytest.raises(InputError, match="starve"):
        embed_shards_ray(photos, out, tiny_model, part_size=16, actors=1, actor_cpus=CPUS, cache=False)
    st = embed_shards_ray(photos, out, tiny_model, part_size=16, batch_size=8, actors=1, actor_cpus=1,
                          cache=False)  # Ray's own work: local_run filled the cache
    assert st.parts_written == 5 and st.embedded == 80
    import os

    assert st.actor_pids and os.getpid() not in st.actor_pids  # the session lived in the actor, not here
    a, b = open_shards(local_run), open_shards(out)
    assert a.keys() == b.keys()
    np.testing.assert_allclose(b.load_all(), a.load_all(), atol=1e-5, rtol=0)
    la = pq.read_table(cluster_shards(local_run, 5, tmp_path / "ca")["out_dir"] + "/assignments.parquet")
    lb = pq.read_table(cluster_shards(out, 5, tmp_path / "cb")["out_dir"] + "/assignments.parquet")
    assert la.column("cluster").to_pylist() == lb.column("cluster").to_pylist()

    # plain pyarrow (no Ray, so no Ray extension types registered) reads our parts as fixed_size_list,
    # while a file Ray itself writes holds its tensor extension type, not a fixed-size list
    ray.data.from_numpy(np.zeros((4, 8), np.float32)).write_parquet(str(tmp_path / "raywrite"))
    code = textwrap.dedent(f"""
        import glob, sys, pyarrow as pa, pyarrow.parquet as pq
        assert "ray" not in sys.modules
        ours = pq.read_schema(glob.glob({str(out)!r} + "/part-*.parquet")[0]).field("vector").type
        theirs = pq.read_schema(glob.glob({str(tmp_path / 'raywrite')!r} + "/*.parquet")[0]).field("data").type
        print(pa.types.is_fixed_size_list(ours), ours.list_size, pa.types.is_fixed_size_list(theirs), theirs)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    ours_fixed, size, theirs_fixed = p.stdout.split()[:3]
    assert (ours_fixed, size, theirs_fixed) == ("True", "64", "False"), p.stdout


def test_ray_work_goes_in_windows_of_whole_parts(local_ray, photos, tiny_model, local_run, tmp_path, monkeypatch):
    """The driver hands Ray a bounded window of whole parts at a time (columnar rows), never the whole
    list: 80 images in parts of 16 with windows of >= 20 images are 3 windows (32, 32, 16), and the
    result equals the local engine's."""
    from itae_export.engines import ray_embed

    seen = []
    real = ray_embed._execute

    def spy(ray_, run, window, *a, **kw):
        seen.append((window.n_rows, sorted(window.parts)))
        assert set(window.columns) == set(ray_embed.ROW_COLUMNS)
        return real(ray_, run, window, *a, **kw)

    monkeypatch.setattr(ray_embed, "_execute", spy)
    out = tmp_path / "ray"
    st = embed_shards_ray(photos, out, tiny_model, part_size=16, batch_size=8, actors=1, actor_cpus=1,
                          window_items=20, cache=False)
    assert [n for n, _ in seen] == [32, 32, 16] and [len(p) for _, p in seen] == [2, 2, 1]
    assert st.parts_written == 5 and st.embedded == 80
    np.testing.assert_allclose(open_shards(out).load_all(), open_shards(local_run).load_all(), atol=1e-5, rtol=0)


def test_the_ray_engine_reads_and_fills_the_shared_cache(local_ray, photos, tiny_model, local_run, tmp_path,
                                                        monkeypatch):
    """What the local engine stored is not sent to Ray (the driver looks it up); what Ray embeds is
    stored, so the local engine then embeds nothing. The files equal the local engine's."""
    import shutil

    from itae_export.engines import ray_embed

    sent = []
    real = ray_embed._execute
    monkeypatch.setattr(ray_embed, "_execute", lambda ray_, run, window, *a, **kw: sent.append(window.n_rows)
                        or real(ray_, run, window, *a, **kw))
    st = embed_shards_ray(photos, tmp_path / "again", tiny_model, part_size=16, batch_size=8, actors=1, actor_cpus=1)
    assert sent == [] and st.reused == 80 and st.embedded == 80 and st.parts_written == 5
    np.testing.assert_array_equal(open_shards(tmp_path / "again").load_all(), open_shards(local_run).load_all())

    copy = tmp_path / "copy"  # other paths: not in the cache
    shutil.copytree(photos, copy)
    st = embed_shards_ray(copy, tmp_path / "ray", tiny_model, part_size=16, batch_size=8, actors=1, actor_cpus=1)
    assert sum(sent) == 80 and st.reused == 0 and st.embedded == 80
    st = embed_shards(copy, tmp_path / "local", tiny_model, part_size=16, batch_size=8, progress=False)
    assert st.reused == 80 and st.embedded == 80
    np.testing.assert_allclose(open_shards(tmp_path / "local").load_all(), open_shards(tmp_path / "ray").load_all(),
                               atol=0, rtol=0)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from itae_export.engines.ray_embed import embed_shards_ray
    n = [0]
    def on_batch(stats):
        n[0] += 1
        if n[0] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
    embed_shards_ray({photos!r}, {out!r}, {model!r}, part_size=16, batch_size=8, actors=1, actor_cpus=1,
                     address={address!r}, on_batch=on_batch, cache=False)
""")


def test_killed_ray_driver_resumes(local_ray, photos, tiny_model, local_run, tmp_path):
    """A Ray driver SIGKILLed after 5 batches; the rerun embeds only what is in neither a part file nor
    the resume record, and the files equal the local engine's."""
    out = tmp_path / "ray"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(photos=str(photos), out=str(out), model=str(tiny_model), address=local_ray))
    p = subprocess.run([sys.executable, str(script), "5"], capture_output=True, text=True, timeout=180)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]

    manifest = read_manifest(out)
    written = [q for q in manifest["parts"] if (out / q["file"]).is_file()]
    import sqlite3

    db = sqlite3.connect(str(next((out / STATE_DIR).glob("*.sqlite"))))
    in_record = db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
    db.close()
    assert 0 < sum(q["n_items"] for q in written) + in_record < 80  # really killed mid-run

    st = embed_shards_ray(photos, out, tiny_model, part_size=16, batch_size=8, actors=1, actor_cpus=1,
                          cache=False)  # Ray's own work: local_run filled the cache
    assert st.parts_done_before == len(written) and st.rows_resumed == in_record
    assert st.embedded == 80 - sum(q["n_items"] for q in written) - in_record
    np.testing.assert_allclose(open_shards(out).load_all(), open_shards(local_run).load_all(), atol=1e-5, rtol=0)
