"""One pipeline under every command (issue 21): the shared embedding cache, the artifact counts and
extra graph outputs of the embed stage."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import imagefolders as datasets
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from itae_export.cli.cluster import main as cluster_cli

from itae_export.data.embed import embed_folder
from itae_export.data.store import LEGACY_STORE_NAME, EmbeddingStore
from itae_export.errors import OptionError
from itae_export.images import load_image
from itae_export.onnx.manifest import read_manifest, reseal
from itae_export.runtime import run_onnx


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "photos"
    datasets.fashion_folder(root, per_class=6, classes=4)
    return root


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ITAE_CACHE_DIR", str(cache))
    return cache


def test_a_second_out_embeds_nothing(photos, tiny_model, tmp_path, own_cache):
    args = [str(photos), "--k", "4", "--onnx", str(tiny_model), "--quiet", "--workers", "1"]
    first = CliRunner().invoke(cluster_cli, [*args, "--out", str(tmp_path / "a")], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "24 embedded, 0 reused" in first.output
    assert (own_cache / "embeddings.sqlite").is_file()
    assert not (tmp_path / "a" / "cache").exists(), "the store lives in the shared cache, not in --out"
    second = CliRunner().invoke(cluster_cli, [*args, "--out", str(tmp_path / "b")], catch_exceptions=False)
    assert second.exit_code == 0, second.output
    assert "0 embedded, 24 reused" in second.output
    counts = json.loads((tmp_path / "b" / "summary.json").read_text())["counts"]
    assert counts["embedded_new"] == 0 and counts["reused"] == 24
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "embeddings.npy"), np.load(tmp_path / "b" / "embeddings.npy"))


def test_a_legacy_store_is_refused_in_one_line(photos, tiny_model, tmp_path, own_cache):
    out = tmp_path / "out"
    (out / LEGACY_STORE_NAME).parent.mkdir(parents=True)
    (out / LEGACY_STORE_NAME).write_bytes(b"SQLite format 3\0")
    res = CliRunner().invoke(cluster_cli, [str(photos), "--k", "4", "--onnx", str(tiny_model), "--out", str(out)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert "earlier itae-export" in line and "delete" in line and "ITAE_CACHE_DIR" in line
    assert not (own_cache / "embeddings.sqlite").exists() or EmbeddingStore(own_cache / "embeddings.sqlite").count() == 0


def test_artifact_counts_are_the_mask_rows(photos, tiny_model, tmp_path, own_cache):
    res = embed_folder(photos, tiny_model, store=EmbeddingStore(), batch_size=5, workers=1, progress=False)
    pre = read_manifest(tiny_model)["preprocessing"]
    x = np.stack([load_image(photos / p, pre) for p in res.paths])
    want = run_onnx(tiny_model, x)["artifact_mask"].sum(axis=1)
    assert res.artifact_counts.dtype == np.int64 and len(res.artifact_counts) == len(res.paths)
    np.testing.assert_array_equal(res.artifact_counts, want)
    again = embed_folder(photos, tiny_model, store=EmbeddingStore(), batch_size=5, workers=1, progress=False)
    assert again.n_new == 0, "the counts are stored beside the vectors and reused"
    np.testing.assert_array_equal(again.artifact_counts, want)


def _with_extra_output(model, dest):
    """The tiny model with one more output, ``embedding_unpatched`` = -embedding (a stand-in)."""
    proto = onnx.load(str(model))
    proto.graph.node.append(onnx.helper.make_node("Neg", ["embedding"], ["embedding_unpatched"]))
    emb = next(o for o in proto.graph.output if o.name == "embedding")
    extra = onnx.ValueInfoProto()
    extra.CopyFrom(emb)
    extra.name = "embedding_unpatched"
    proto.graph.output.append(extra)
    reseal(proto)  # another graph on purpose, not one changed behind its digest
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dest))
    shutil.copy(model.with_suffix(".json"), dest.with_suffix(".json"))
    return dest


def test_extra_outputs_are_kept_and_stored(photos, tiny_model, tmp_path, own_cache):
    model = _with_extra_output(tiny_model, tmp_path / "m" / "model.onnx")
    kw = dict(batch_size=5, workers=1, progress=False, extra_outputs=("embedding_unpatched",))
    res = embed_folder(photos, model, store=EmbeddingStore(), **kw)
    np.testing.assert_allclose(res.extra["embedding_unpatched"], -res.embeddings, atol=1e-6)
    with EmbeddingStore() as store:
        assert store.count(res.model_id + "#embedding_unpatched") == 24
    again = embed_folder(photos, model, store=EmbeddingStore(), **kw)
    assert again.n_new == 0
    np.testing.assert_array_equal(again.extra["embedding_unpatched"], res.extra["embedding_unpatched"])
    with pytest.raises(OptionError, match="no output 'nope'"):
        embed_folder(photos, model, store=None, batch_size=5, workers=1, progress=False, extra_outputs=("nope",))


# ---------------------------------------------------------------- one source layer

BAD = os.fsdecode(b"latin1-\xe9t\xe9.png")  # not valid UTF-8: names are bytes on Linux


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One set of images as a folder, a WebDataset tar and a .txt list; one name is not UTF-8."""
    base = tmp_path_factory.mktemp("inputs")
    root = base / "photos"
    datasets.fashion_folder(root, per_class=5, classes=3)
    first = sorted(root.rglob("*.png"))[0]
    shutil.copy(first, first.parent / BAD)
    rel = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    with tarfile.open(base / "photos.tar", "w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for r in rel:
            tf.add(root / r, arcname=r)
    (base / "list.txt").write_bytes(b"\n".join(os.fsencode(f"photos/{r}") for r in rel) + b"\n")
    return base, rel


def _vectors_by_name(out: Path, strip) -> dict[bytes, np.ndarray]:
    from itae_export.data.outputs import read_csv

    rows = read_csv(out / "assignments.csv")
    emb = np.load(out / "embeddings.npy")
    return {os.fsencode(strip(r["path"])): v for r, v in zip(rows, emb)}


def test_cluster_folder_tar_and_list_give_the_same_vectors(inputs, tiny_model, tmp_path):
    base, rel = inputs
    got = {}
    for name, spec, strip in (("folder", base / "photos", lambda k: k),
                              ("tar", base / "photos.tar", lambda k: k.removeprefix("photos.tar/") + ".png"),
                              ("list", base / "list.txt", lambda k: k.removeprefix("photos/"))):
        out = tmp_path / name
        extra = ["--save-inputs"] if name == "list" else []  # a list's keys join its folder: the files reopen
        res = CliRunner().invoke(cluster_cli, [str(spec), "--k", "3", "--onnx", str(tiny_model), "--out", str(out),
                                               "--quiet", "--workers", "1", *extra])
        assert res.exit_code == 0, (name, res.output)
        if extra:
            assert np.load(out / "pixel_values.npy").shape[0] == len(rel)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["counts"]["embedded"] == len(rel) and summary["input"]["kind"] == {
            "folder": "folder", "tar": "webdataset", "list": "list"}[name]
        got[name] = _vectors_by_name(out, strip)
    assert set(got["folder"]) == {os.fsencode(r) for r in rel} == set(got["tar"]) == set(got["list"])
    assert os.fsencode(BAD) in {k.rsplit(b"/", 1)[-1] for k in got["folder"]}
    for k, v in got["folder"].items():
        np.testing.assert_array_equal(got["tar"][k], v)
        np.testing.assert_array_equal(got["list"][k], v)


def test_embed_run_takes_any_name_and_shares_the_cache(inputs, tiny_model, tmp_path, own_cache):
    """itae-embed run: non-UTF-8 names in a folder, a list and a tar member embed; a folder that
    itae-cluster embedded is reused from the shared cache, and the vectors are itae-cluster's."""
    from itae_export.cli.embed import main as embed_cli
    from itae_export.data.shards import open_shards

    base, rel = inputs
    out = tmp_path / "c"
    res = CliRunner().invoke(cluster_cli, [str(base / "photos"), "--k", "3", "--onnx", str(tiny_model), "--out",
                                           str(out), "--quiet", "--workers", "1"])
    assert res.exit_code == 0, res.output
    ref = _vectors_by_name(out, lambda k: k)
    for name, spec in (("folder", base / "photos"), ("list", base / "list.txt"), ("tar", base / "photos.tar")):
        shards = tmp_path / f"s-{name}"
        res = CliRunner().invoke(embed_cli, ["run", str(spec), "--out", str(shards), "--onnx", str(tiny_model),
                                             "--quiet", "--workers", "1"])
        assert res.exit_code == 0 and "Traceback" not in res.output, (name, res.output)
        if name == "folder":
            assert f"0 embedded, {len(rel)} reused" in res.output, res.output
        s = open_shards(shards)
        keys, vecs = s.keys(), s.load_all()
        assert len(keys) == len(rel) and not s.skipped(), (name, s.skipped())
        assert any("\\xe9" in k for k in keys), "a non-UTF-8 name is kept, its bytes escaped"
        if name == "folder":
            want = {os.fsencode(r).decode("utf-8", "backslashreplace"): ref[os.fsencode(r)] for r in rel}
            for k, v in zip(keys, vecs):
                np.testing.assert_array_equal(v, want[k])


def test_embed_run_and_cluster_match_itae_cluster_and_search_reads_every_output(inputs, tiny_model, tmp_path):
    """itae-embed run + itae-embed cluster: the same vectors and the same output set as itae-cluster;
    itae-search queries an itae-cluster folder, an itae-embed cluster folder and a shard folder."""
    from itae_export.cli.embed import main as embed_cli
    from itae_export.cli.search import main as search_cli
    from itae_export.data.outputs import read_csv
    from itae_export.search.index import read_collection

    base, rel = inputs
    single, shards, clusters = tmp_path / "single", tmp_path / "shards", tmp_path / "clusters"
    runner = CliRunner()
    res = runner.invoke(cluster_cli, [str(base / "photos"), "--k", "3", "--onnx", str(tiny_model), "--out",
                                      str(single), "--quiet", "--workers", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(embed_cli, ["run", str(base / "photos"), "--out", str(shards), "--onnx", str(tiny_model),
                                    "--quiet", "--part-size", "7"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(embed_cli, ["cluster", str(shards), "--k", "3", "--out", str(clusters), "--quiet"])
    assert res.exit_code == 0, res.output

    one = json.loads((single / "summary.json").read_text())
    two = json.loads((clusters / "summary.json").read_text())
    shared = {"folder", "input", "out_dir", "onnx", "model_id", "model", "itae", "precision", "preprocessing",
              "embed_dim", "counts", "method", "clustering", "cluster_sizes", "timings"}
    assert shared <= set(one) and shared <= set(two), (shared - set(one), shared - set(two))
    assert one["model_id"] == two["model_id"] and one["counts"]["embedded"] == two["counts"]["embedded"] == len(rel)
    assert {r["path"] for r in read_csv(single / "assignments.csv")} == {
        os.fsdecode(os.fsencode(r["path"])) for r in read_csv(single / "assignments.csv")}
    assert len(read_csv(clusters / "assignments.csv")) == len(rel)

    _, keys1, v1 = read_collection(single)
    _, keys2, v2 = read_collection(clusters)
    _, keys3, v3 = read_collection(shards)
    assert keys2 == keys3
    want = dict(zip((os.fsencode(k).decode("utf-8", "backslashreplace") for k in keys1), np.asarray(v1)))
    assert set(keys2) == set(want)
    for k, v in zip(keys2, v2):
        np.testing.assert_array_equal(v, want[k])

    probe = base / "photos" / rel[-1]  # rel[0]'s pixels are also those of the non-UTF-8 copy
    for collection in (single, clusters, shards):
        r = runner.invoke(search_cli, ["query", str(collection), "--image", str(probe), "-k", "3"])
        assert r.exit_code == 0 and "Traceback" not in r.output, (collection, r.output)
        assert r.stdout.splitlines()[1].startswith(f"1,{rel[-1]},"), r.stdout


def test_itae_cluster_switches_to_the_sharded_stages(inputs, tiny_model, tmp_path, monkeypatch):
    """From SHARDED_MIN_IMAGES on, itae-cluster runs itae-embed run + cluster by itself: the same
    vectors, the same output set, and itae-search reads it."""
    import itae_export.cluster.shard_cluster as sc
    from itae_export.data.outputs import read_csv
    from itae_export.search.index import read_collection

    base, rel = inputs
    args = [str(base / "photos"), "--k", "3", "--onnx", str(tiny_model), "--workers", "1"]
    small = CliRunner().invoke(cluster_cli, [*args, "--out", str(tmp_path / "small")])
    assert small.exit_code == 0, small.output
    monkeypatch.setattr(sc, "SHARDED_MIN_IMAGES", len(rel))
    big = CliRunner().invoke(cluster_cli, [*args, "--out", str(tmp_path / "big")])
    assert big.exit_code == 0 and "sharded stages" in big.output, big.output
    assert f"0 embedded, {len(rel)} reused" in big.output, big.output
    summary = json.loads((tmp_path / "big" / "summary.json").read_text())
    assert summary["shards"] == str(tmp_path / "big" / "shards") and summary["counts"]["embedded"] == len(rel)
    assert len(read_csv(tmp_path / "big" / "assignments.csv")) == len(rel)
    _, k1, v1 = read_collection(tmp_path / "small")
    _, k2, v2 = read_collection(tmp_path / "big")
    want = dict(zip((os.fsencode(k).decode("utf-8", "backslashreplace") for k in k1), np.asarray(v1)))
    for k, v in zip(k2, v2):
        np.testing.assert_array_equal(v, want[k])


@pytest.mark.parametrize("command", ["itae-cluster", "itae-embed run"])
def test_heic_and_avif_are_counted_never_ignored(command, tiny_model, tmp_path):
    """A HEIC file (no Pillow plugin here) is found, counted and listed in skipped.csv with the
    reason; an AVIF is embedded where Pillow decodes it, else skipped the same way."""
    from PIL import Image, features

    from itae_export.cli.embed import main as embed_cli
    from itae_export.data.outputs import read_csv
    from itae_export.data.shards import open_shards

    root = tmp_path / "photos"
    datasets.fashion_folder(root, per_class=3, classes=2)
    (root / "trouser" / "phone.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + os.urandom(200))
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "trouser" / "pic.avif") if features.check("avif") else \
        (root / "trouser" / "pic.avif").write_bytes(b"\0\0\0\x1cftypavif" + os.urandom(200))
    out = tmp_path / "out"
    if command == "itae-cluster":
        res = CliRunner().invoke(cluster_cli, [str(root), "--k", "2", "--onnx", str(tiny_model), "--out", str(out),
                                               "--quiet"])
        assert res.exit_code == 0, res.output
        skipped = {r["path"]: r["reason"] for r in read_csv(out / "skipped.csv")}
        assert json.loads((out / "summary.json").read_text())["counts"]["found"] == 8
    else:
        res = CliRunner().invoke(embed_cli, ["run", str(root), "--out", str(out), "--onnx", str(tiny_model), "--quiet"])
        assert res.exit_code == 0, res.output
        skipped = dict(open_shards(out).skipped())
    assert "HEIC is a format this Pillow cannot decode" in skipped["trouser/phone.HEIC"], skipped
    assert ("trouser/pic.avif" in skipped) != features.check("avif"), skipped
