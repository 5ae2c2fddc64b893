"""The resume key of the embedding store: a stored vector is reused only when the file's size, its
mtime AND its ctime still match (issue 12: a store that compared the size alone passed the whole
suite; cp -p and rsync keep size and mtime, not the ctime)."""

from __future__ import annotations

import os
import time

import imagefolders as datasets
import numpy as np

from itae_export.cluster.job import run_cluster_job
from itae_export.data.store import EmbeddingStore, cache_dir, default_store_path, file_key


def test_lookup_needs_size_mtime_and_ctime(tmp_path):
    a, b = b"/x/a.png", b"/x/b\xe9.png"  # keys are bytes: any file name
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        store.add("m", [(a, 100, 5_000, 7), (b, 200, 6_000, 8)], np.eye(2, 3, dtype=np.float32), [3, -1])
        hit = store.lookup("m", {a: (100, 5_000, 7), b: (200, 6_000, 8)})
        assert set(hit) == {a, b}
        np.testing.assert_array_equal(hit[b][0], [0, 1, 0])
        assert hit[a][1] == 3 and hit[b][1] == -1, "the artifact counts are stored beside the vectors"
        assert store.lookup("m", {a: (100, 5_001, 7)}) == {}, "same size, another mtime: reused"
        assert store.lookup("m", {a: (101, 5_000, 7)}) == {}, "same mtime, another size: reused"
        assert store.lookup("m", {a: (100, 5_000, 9)}) == {}, "same size and mtime, another ctime: reused"
        assert store.lookup("other", {a: (100, 5_000, 7)}) == {}, "another model's row reused"


def test_the_store_is_the_shared_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path / "c"))
    assert default_store_path() == tmp_path / "c" / "embeddings.sqlite"
    monkeypatch.delenv("ITAE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "itae-export"


def test_file_key_sees_an_mtime_change_alone(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"1234")
    before = file_key(p)
    os.utime(p, ns=(time.time_ns(), before[1] + 1_000_000))
    assert file_key(p)[0] == before[0] and file_key(p) != before


def test_same_size_new_content_is_embedded_again(tiny_model, tmp_path):
    """A BMP of the same dimensions has the same byte size whatever its pixels: rewriting one
    with other pixels (a new mtime, the same size) must not reuse its old vector."""
    from PIL import Image

    root = tmp_path / "bmp"
    labels = datasets.fashion_folder(root, per_class=3, classes=2, fmt="bmp")
    out = tmp_path / "out"
    first = run_cluster_job(root, tiny_model, 2, out, progress=False)
    assert first["counts"]["embedded_new"] == 6
    victim = sorted(labels)[2]
    size = (root / victim).stat().st_size
    old = np.load(out / "embeddings.npy")[2]
    old_mtime = (root / victim).stat().st_mtime_ns
    Image.fromarray(np.full((28, 28), 200, np.uint8), mode="L").save(root / victim)
    os.utime(root / victim, ns=(time.time_ns(), old_mtime + 10_000_000))
    assert (root / victim).stat().st_size == size, "setup: the rewritten BMP changed size"
    again = run_cluster_job(root, tiny_model, 2, out, progress=False)
    assert again["counts"]["embedded_new"] == 1 and again["counts"]["reused"] == 5
    assert not np.allclose(np.load(out / "embeddings.npy")[2], old)
