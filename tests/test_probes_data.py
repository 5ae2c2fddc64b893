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
