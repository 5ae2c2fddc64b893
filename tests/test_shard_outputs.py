"""The sharded stages write the output set of itae-cluster (issues 21 and 23): the per-image artifact
count in every part, summary.json's ``artifacts`` block, ``--labels-from-dirs`` metrics and the report."""

from __future__ import annotations

import json
import sqlite3

import imagefolders as datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from itae_export.cli.cluster import main as cluster_cli
from itae_export.cli.embed import main as embed_cli

from itae_export.cluster import shard_cluster
from itae_export.data import shards as sh
from itae_export.data.outputs import read_csv
from itae_export.engines.ray_embed import embed_shards_ray


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_outputs") / "photos"
    datasets.fashion_folder(root, per_class=6, classes=4)
    return root


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path / "cache"))


def _invoke(cli, *argv):
    r = CliRunner().invoke(cli, [str(a) for a in argv])
    assert "Traceback" not in r.output, r.output
    assert r.exit_code == 0, r.output
    return r


def _embed(photos, model, shards, *more):
    return _invoke(embed_cli, "run", photos, "--out", shards, "--onnx", model, "-q", "--part-size", "10", *more)


def test_parts_carry_the_artifact_count_of_the_in_memory_embed_stage(photos, tiny_model, tmp_path):
    cl = tmp_path / "cl"
    _invoke(cluster_cli, photos, "--k", "4", "--onnx", tiny_model, "--out", cl, "--quiet", "--workers", "1")
    shards = tmp_path / "shards"
    _embed(photos, tiny_model, shards, "--no-cache")  # counted by this run's graph, not the cache
    s = sh.open_shards(shards)
    assert len(s.files) == 3
    for f in s.files:
        assert pq.read_schema(f).field(sh.ARTIFACTS).type == "int32"
    counts = dict(zip(s.keys(), s.artifacts().tolist()))
    summary = json.loads((cl / "summary.json").read_text())
    assert summary["artifacts"]["available"], summary["artifacts"]
    assert min(counts.values()) >= 0 and sum(counts.values()) == summary["artifacts"]["tokens_flagged"]
    for m in summary["artifacts"]["most_flagged"]:
        assert counts[m["path"]] == m["tokens"]
    # a second run into another folder takes the vectors and the counts from the shared cache
    again = tmp_path / "again"
    _embed(photos, tiny_model, again)
    s2 = sh.open_shards(again)
    assert dict(zip(s2.keys(), s2.artifacts().tolist())) == counts


def test_the_digest_covers_the_counts_and_an_old_part_reads_as_not_counted(tmp_path):
    idx, keys = np.arange(3), ["a/1.png", "a/2.png", "b/3.png"]
    vecs = np.ones((3, 4), np.float32)
    path = sh.write_part(tmp_path, 0, idx, keys, vecs, plan_id="p", model_id="m", skipped=[], artifacts=[0, 2, 5])
    assert sh.part_status(tmp_path, 0, "p")[0] == "complete"
    np.testing.assert_array_equal(sh.part_artifacts(path), [0, 2, 5])
    # a count changed, the rest of the file (and its footer's digest) as written: corrupt
    t = pq.read_table(path)
    forged = t.set_column(t.schema.get_field_index(sh.ARTIFACTS), sh.ARTIFACTS, pa.array([0, 2, 6], pa.int32()))
    pq.write_table(forged.replace_schema_metadata(t.schema.metadata), path)
    state, why = sh.part_status(tmp_path, 0, "p")
    assert state == "corrupt" and "digest" in why
    # a part of an earlier version: no column, its digest over the other columns: complete, counts -1
    meta = dict(t.schema.metadata)
    meta[sh.DIGEST_KEY] = sh.part_digest(idx, keys, vecs).encode()
    pq.write_table(sh.part_table(idx, keys, vecs).replace_schema_metadata(meta), path)
    assert sh.part_status(tmp_path, 0, "p")[0] == "complete"
    np.testing.assert_array_equal(sh.part_artifacts(path), [sh.NO_COUNT] * 3)


def test_the_resume_record_keeps_the_count(tmp_path):
    state = sh.ShardState(tmp_path / "s.sqlite")
    state.add(0, [(0, "a", np.ones(4, np.float32), None, 7), (1, "b", None, "broken"), (2, "c", np.ones(4), None)])
    assert [r[4] for r in state.rows(0)] == [7, sh.NO_COUNT, sh.NO_COUNT]
    state.close()
    # a record of an earlier version (no artifacts column) is opened and gets the column
    old = tmp_path / "old.sqlite"
    db = sqlite3.connect(old)
    db.executescript("CREATE TABLE rows (part INTEGER NOT NULL, pos INTEGER NOT NULL, key TEXT NOT NULL, "
                     "vector BLOB, reason TEXT, PRIMARY KEY (part, pos)); "
                     "INSERT INTO rows VALUES (0, 0, 'a', NULL, 'x');")
    db.close()
    state = sh.ShardState(old)
    assert [tuple(r) for r in state.rows(0)] == [(0, "a", None, "x", sh.NO_COUNT)]
    state.close()


def test_embed_cluster_writes_the_output_set_of_itae_cluster(photos, tiny_model, tmp_path):
    cl = tmp_path / "cl"
    _invoke(cluster_cli, photos, "--k", "4", "--onnx", tiny_model, "--out", cl, "--quiet", "--workers", "1",
            "--labels-from-dirs")
    shards, out = tmp_path / "shards", tmp_path / "emb"
    _embed(photos, tiny_model, shards)
    r = _invoke(embed_cli, "cluster", shards, "--k", "4", "--out", out, "--labels-from-dirs", "--report", "-q")
    assert "ACC " in r.output and "Artifacts" in r.output
    mem = json.loads((cl / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    assert set(got["metrics"]) == set(mem["metrics"]) and got["labels"] == mem["labels"]
    for key in ("acc", "nmi", "ari", "many_to_one_acc"):
        assert got["metrics"][key] == pytest.approx(mem["metrics"][key])
    assert got["artifacts"] == mem["artifacts"]
    rows = {r["path"]: r for r in read_csv(out / "assignments.csv")}
    assert all(r["label"] == p.split("/")[0] for p, r in rows.items())
    assert pq.read_table(out / "assignments.parquet").column("label").to_pylist() == [r["label"] for r in
                                                                                      read_csv(out / "assignments.csv")]
    page = (out / "report.html").read_text()
    assert "Metrics against the true labels" in page and 'id="n-breakaway"' in page and "What ITAE did" in page
    assert (out / "map.png").is_file()


def test_labels_at_the_root_fail_in_one_line(tiny_model, tmp_path):
    flat = tmp_path / "flat"
    datasets.fashion_folder(tmp_path / "tmp", per_class=3, classes=2)
    flat.mkdir()
    for i, f in enumerate(sorted((tmp_path / "tmp").rglob("*.png"))):
        f.rename(flat / f"{i}.png")
    shards = tmp_path / "shards"
    _embed(flat, tiny_model, shards)
    r = CliRunner().invoke(embed_cli, ["cluster", str(shards), "--k", "2", "--labels-from-dirs", "-q"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "--labels-from-dirs" in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_itae_cluster_switches_to_the_sharded_stages_with_labels(photos, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(shard_cluster, "SHARDED_MIN_IMAGES", 10)
    out = tmp_path / "out"
    r = _invoke(cluster_cli, photos, "--k", "4", "--onnx", tiny_model, "--out", out, "--quiet",
                "--labels-from-dirs", "--report")
    s = json.loads((out / "summary.json").read_text())
    assert "Metrics against the true labels" in (out / "report.html").read_text()
    assert s["shards"] == str((out / shard_cluster.SHARD_DIR).resolve())
    assert set(s["metrics"]) >= {"acc", "nmi", "ari"} and s["labels"]["n_classes"] == 4
    assert s["artifacts"]["available"] and "ACC " in r.output


def test_the_ray_engine_writes_the_same_counts(photos, tiny_model, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray engine needs the [ray] extra")
    pytest.importorskip("ray.data", reason="the Ray engine needs ray[data]")
    local = tmp_path / "local"
    _embed(photos, tiny_model, local, "--no-cache")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        embed_shards_ray(photos, tmp_path / "ray", tiny_model, part_size=10, batch_size=8, actors=1, actor_cpus=1,
                         cache=False)  # counted by Ray's actors, not read back from the cache
    finally:
        ray.shutdown()
    a, b = sh.open_shards(local), sh.open_shards(tmp_path / "ray")
    assert b.keys() == a.keys() and (a.artifacts() >= 0).all()
    np.testing.assert_array_equal(b.artifacts(), a.artifacts())


def test_parts_of_an_earlier_version_say_why_they_are_not_counted(photos, tiny_model, tmp_path):
    shards = tmp_path / "shards"
    _embed(photos, tiny_model, shards)
    first = sh.open_shards(shards).files[0]
    t = pq.read_table(first)
    meta = dict(t.schema.metadata)
    old = t.drop_columns([sh.ARTIFACTS])
    meta[sh.DIGEST_KEY] = sh.part_digest(old.column("idx").to_numpy(), old.column("key").to_pylist(),
                                         sh.read_part(first)[1]).encode()
    for f in (shards / sh.STATE_DIR).glob("*.sqlite"):
        f.unlink()  # the record kept the new digest; an earlier version's part stands on its footer
    pq.write_table(old.replace_schema_metadata(meta), first)
    r = _invoke(embed_cli, "cluster", shards, "--k", "4", "--out", tmp_path / "c", "-q")
    a = json.loads((tmp_path / "c" / "summary.json").read_text())["artifacts"]
    assert not a["available"] and "earlier version" in a["reason"] and first.name in a["reason"]
    assert "earlier version" in r.output
