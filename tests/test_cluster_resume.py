"""Interrupt a real itae-cluster process, run it again: only the missing images are embedded."""

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import imagefolders as datasets
import numpy as np
import pytest

from itae_export.cluster.job import run_cluster_job
from itae_export.data.store import default_store_path


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own embedding cache (the module's reference run fills the session's)."""
    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume") / "photos"
    datasets.fashion_folder(root, per_class=40)  # 400 images
    return root


@pytest.fixture(scope="module")
def reference(photos, tiny_model, tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    run_cluster_job(photos, tiny_model, 10, out, batch_size=4, progress=False)
    return out


def _rows_in_store(path) -> int:
    if not path.exists():
        return 0
    try:
        db = sqlite3.connect(str(path), timeout=5)
        try:
            return db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0  # the table is not created yet


def _start_and_interrupt(photos, model, out, sig, after_rows=12):
    """Start itae-cluster in a subprocess; send ``sig`` once ``after_rows`` rows are committed.

    The child gets the default SIGINT disposition: a test run started in the background (``nohup
    ... &``) ignores SIGINT, the child would inherit that, and Python then installs no
    KeyboardInterrupt handler, so the job would run to the end."""
    args = [sys.executable, "-m", "itae_export.cli.cluster", str(photos), "--k", "10", "--onnx", str(model),
            "--out", str(out), "--batch-size", "4", "--workers", "1", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    store = default_store_path()
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if _rows_in_store(store) >= after_rows:
                proc.send_signal(sig)
                break
            time.sleep(0.005)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, _rows_in_store(store)


def _assignments(out):
    with open(out / "assignments.csv", newline="") as f:
        return [(r["path"], r["cluster"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupt_then_resume(sig, photos, tiny_model, reference, tmp_path):
    out = tmp_path / "out"
    rc, err, committed = _start_and_interrupt(photos, tiny_model, out, sig)
    if rc == 0:
        pytest.fail("the job finished before it could be interrupted")
    assert 0 < committed < 400, (rc, err)
    assert not (out / "summary.json").exists() and not (out / "assignments.csv").exists()
    if sig == signal.SIGINT:
        assert rc == 130 and "run the same command again to resume" in err and "Traceback" not in err
    else:
        assert rc == -signal.SIGKILL

    summary = run_cluster_job(photos, tiny_model, 10, out, batch_size=4, progress=False)
    # the committed rows were reused, not embedded again
    assert summary["counts"]["reused"] == committed
    assert summary["counts"]["embedded_new"] == 400 - committed
    assert _assignments(out) == _assignments(reference)
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), np.load(reference / "embeddings.npy"), atol=1e-5)
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert summary["cluster_sizes"] == ref_summary["cluster_sizes"]


def _perturbed_copy(model, dest):
    import shutil

    import onnx
    from onnx import numpy_helper

    from itae_export.onnx.manifest import reseal

    proto = onnx.load(str(model))
    init = next(t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    reseal(proto)  # another model on purpose: a valid export of other weights
    dest.parent.mkdir(parents=True)
    onnx.save(proto, str(dest))
    shutil.copy(model.with_suffix(".json"), dest.with_suffix(".json"))
    return dest


def test_changed_file_and_other_model_are_embedded_again(tiny_model, tmp_path):
    from PIL import Image

    root = tmp_path / "small"
    labels = datasets.fashion_folder(root, per_class=4, classes=3)
    out = tmp_path / "out"
    first = run_cluster_job(root, tiny_model, 3, out, progress=False)
    assert first["counts"]["embedded_new"] == 12

    again = run_cluster_job(root, tiny_model, 3, out, progress=False)
    assert again["counts"] == {**first["counts"], "embedded_new": 0, "reused": 12}

    # replace one image's content: size or mtime changes, so it is embedded again
    victim = sorted(labels)[5]
    old = np.load(out / "embeddings.npy")[5]
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(root / victim)
    os.utime(root / victim, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    changed = run_cluster_job(root, tiny_model, 3, out, progress=False)
    assert changed["counts"]["embedded_new"] == 1 and changed["counts"]["reused"] == 11
    assert not np.allclose(np.load(out / "embeddings.npy")[5], old)

    emb_changed = np.load(out / "embeddings.npy")
    # another model (the same graph, one weight changed) never reuses these rows
    other = _perturbed_copy(tiny_model, tmp_path / "other" / "model.onnx")
    third = run_cluster_job(root, other, 3, out, progress=False)
    assert third["counts"]["reused"] == 0 and third["counts"]["embedded_new"] == 12
    assert third["model_id"] != changed["model_id"]
    assert not np.allclose(np.load(out / "embeddings.npy"), emb_changed, atol=1e-3)
