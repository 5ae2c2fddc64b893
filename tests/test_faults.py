"""The fault suite: bad inputs and injected faults, as a careless or hostile user meets them.

Each case asserts the exit code, one line of error with no traceback, and that nothing finished
was lost. docs/reliability.md lists every case and what the tool promises for it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from itae_export.cli.cluster import main as cluster_cli
from itae_export.cli.inspect import main as inspect_cli
from itae_export.cli.validate import main as validate_cli
from PIL import Image

from itae_export.data.outputs import read_csv, read_outputs
from itae_export.data.store import default_store_path
from itae_export.onnx.contract import METADATA_KEY, STAGING_OWNER
from itae_export.onnx.manifest import reseal

NAMES = ["plain.png", "with, comma.png", 'quote".png', "=cmd.png", "+1.png", "-dash.png", "@at.png",
         "new\nline.png", "ünï cödé.png"]
BAD_NAME = os.fsdecode(b"latin1-\xe9t\xe9.png")  # not valid UTF-8: names are bytes on Linux


def _folder(root: Path, n: int = 24, names=()) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "a" / name)
    return root


def _run(cmd, args):
    return CliRunner().invoke(cmd, [str(a) for a in args])


def _one_line_error(res, code: int, *needles: str) -> None:
    assert res.exit_code == code, (res.exit_code, res.output)
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in errors[0], res.output


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def images(tmp_path):
    return _folder(tmp_path / "imgs")



# ---------------------------------------------------------------- names and outputs


def test_any_file_name_is_embedded_and_round_trips_through_csv(tmp_path, tiny_model):
    root = _folder(tmp_path / "imgs", 6, NAMES + [BAD_NAME])
    out = tmp_path / "out"
    res = _run(cluster_cli, [root, "--k", 2, "--onnx", tiny_model, "--out", out, "--report"])
    assert res.exit_code == 0, res.output
    rows = read_csv(out / "assignments.csv")
    got = {r["path"] for r in rows}
    assert {f"a/{n}" for n in NAMES + [BAD_NAME]} <= got
    assert os.fsencode(f"a/{BAD_NAME}") in {os.fsencode(p) for p in got}  # the same bytes as on disk
    raw = (out / "assignments.csv").read_bytes()
    for cell in ("=cmd", "+1", "-dash", "@at"):  # spreadsheet formulas are neutralised by a leading '
        assert f"'a/{cell}".encode() not in raw and f"a/{cell}".encode() in raw  # paths start with a/, so raw
    # a bare cell that begins with '=' gets the apostrophe
    from itae_export.data.outputs import csv_bytes
    assert csv_bytes(["x"], [["=1+1"]]).splitlines()[1] == b"'=1+1"
    assert (out / "report.html").is_file()
    # resume: every name is found in the store again
    res = _run(cluster_cli, [root, "--k", 2, "--onnx", tiny_model, "--out", out])
    assert res.exit_code == 0 and json.loads((out / "summary.json").read_text())["counts"]["embedded_new"] == 0


def test_outputs_are_one_set_and_a_mixed_folder_is_refused(images, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert _run(cluster_cli, [images, "--k", 2, "--onnx", tiny_model, "--out", out]).exit_code == 0
    first = json.loads((out / "summary.json").read_text())
    assert set(first["outputs"]) == {"assignments.csv", "embeddings.npy", "skipped.csv"} and first["run_id"]
    read_outputs(out)  # consistent
    saved = (out / "assignments.csv").read_bytes()
    assert _run(cluster_cli, [images, "--k", 3, "--onnx", tiny_model, "--out", out]).exit_code == 0
    (out / "assignments.csv").write_bytes(saved)  # a file of the first run beside the second run's summary
    with pytest.raises(Exception, match="mixes two runs"):
        read_outputs(out)


def test_a_failure_while_publishing_leaves_no_summary_of_another_run(images, tiny_model, tmp_path, monkeypatch):
    import itae_export.data.outputs as outputs

    out = tmp_path / "out"
    assert _run(cluster_cli, [images, "--k", 2, "--onnx", tiny_model, "--out", out]).exit_code == 0
    real = os.replace
    calls = []

    def failing_replace(src, dst):
        if not Path(dst).name.startswith("."):  # a rename into the published set, not a staged write
            calls.append(dst)
            if len(calls) == 2:  # the second file of the new set
                raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    res = _run(cluster_cli, [images, "--k", 3, "--onnx", tiny_model, "--out", out])
    _one_line_error(res, 1, "disk is full")
    assert not (out / "summary.json").exists()  # no summary describes files of another run
    assert not list(out.glob(".*.staged"))
    with pytest.raises(Exception, match="incomplete"):
        read_outputs(out)


@pytest.mark.parametrize("where", ["folder", "parent"])
def test_out_equal_to_the_folder_and_to_its_parent(images, tiny_model, where):
    n = len(list(images.rglob("*.png")))
    out = images if where == "folder" else images.parent
    if True:
        for _ in range(2):  # the second run must not cluster its own map.png or thumbnails
            res = _run(cluster_cli, [images, "--k", 2, "--onnx", tiny_model, "--out", out, "--report"])
            assert res.exit_code == 0, res.output
            assert json.loads((out / "summary.json").read_text())["counts"]["found"] == n


# ---------------------------------------------------------------- disks and caches


def test_disk_full_is_told_and_the_finished_batches_are_kept(tmpfs, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmpfs / "cache"))  # the embedding cache on the full disk
    root = _folder(tmp_path / "imgs", 160)
    ballast = tmpfs / "ballast"
    ballast.write_bytes(b"\0" * (1024 * 1024 - 96 * 1024))  # leave ~96 KiB: a few batches fit, not all
    out = tmpfs / "out"
    res = _run(cluster_cli, [root, "--k", 2, "--onnx", tiny_model, "--out", out, "--batch-size", 4])
    _one_line_error(res, 1, "disk is full")
    assert "delete" not in res.output  # the store is healthy: no advice to delete it
    ballast.unlink()
    res = _run(cluster_cli, [root, "--k", 2, "--onnx", tiny_model, "--out", out, "--batch-size", 4])
    assert res.exit_code == 0, res.output
    counts = json.loads((out / "summary.json").read_text())["counts"]
    assert counts["reused"] > 0 and counts["reused"] + counts["embedded_new"] == 160


def test_read_only_output_is_one_line(tmpfs, images, tiny_model):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    res = _run(cluster_cli, [images, "--k", 2, "--onnx", tiny_model, "--out", tmpfs / "out"])
    _one_line_error(res, 1, "read-only")


def test_output_under_a_file(images, tiny_model, tmp_path):
    (tmp_path / "file").write_text("x")
    res = _run(cluster_cli, [images, "--k", 2, "--onnx", tiny_model, "--out", tmp_path / "file" / "out"])
    _one_line_error(res, 1, "file")


def test_corrupt_cache_is_told_apart(images, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert _run(cluster_cli, [images, "--k", 2, "--onnx", tiny_model, "--out", out]).exit_code == 0
    store = default_store_path()
    data = bytearray(store.read_bytes())
    data[100:4096] = os.urandom(4096 - 100)  # a corrupt first page
    for side in store.parent.glob("embeddings.sqlite-*"):
        side.unlink()
    store.write_bytes(bytes(data))
    res = _run(cluster_cli, [images, "--k", 2, "--onnx", tiny_model, "--out", out])
    _one_line_error(res, 1, "corrupt", "delete it", str(store))


# ---------------------------------------------------------------- models and manifests


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    return dst


def test_tampered_sidecar_manifest_names_the_field(images, tiny_model, tmp_path):
    model = _copy_model(tiny_model, tmp_path / "m.onnx")
    side = json.loads(model.with_suffix(".json").read_text())
    side["preprocessing"]["mean"] = [0.0, 0.0, 0.0]
    model.with_suffix(".json").write_text(json.dumps(side))
    res = _run(cluster_cli, [images, "--k", 2, "--onnx", model, "--out", tmp_path / "out"])
    _one_line_error(res, 1, "preprocessing.mean")


def test_graph_that_breaks_the_contract(images, tiny_model, tmp_path):
    from onnx import TensorProto, helper

    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 56, 56])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 56, 56])]),
        opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(json.loads(tiny_model.with_suffix(".json").read_text()))
    onnx.save(proto, tmp_path / "wrong.onnx")
    res = _run(cluster_cli, [images, "--k", 2, "--onnx", tmp_path / "wrong.onnx", "--out", tmp_path / "out"])
    _one_line_error(res, 1, "not an itae-export encoder", "pixel_values")
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "foreign.onnx")
    res = _run(cluster_cli, [images, "--k", 2, "--onnx", tmp_path / "foreign.onnx", "--out", tmp_path / "out"])
    _one_line_error(res, 1, "not an itae-export model")


def test_truncated_model(images, tiny_model, tmp_path):
    model = _copy_model(tiny_model, tmp_path / "t.onnx")
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    _one_line_error(_run(validate_cli, [model]), 1, "not a readable ONNX model")
    res = _run(cluster_cli, [images, "--k", 2, "--onnx", model, "--out", tmp_path / "out"])
    _one_line_error(res, 1, "not a readable ONNX model")


def test_nan_embeddings_are_skipped_not_stored(images, tiny_model, tmp_path):
    model = _copy_model(tiny_model, tmp_path / "nan.onnx")
    proto = onnx.load(str(model))
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr[...] = np.nan
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    reseal(proto)  # a model that really computes NaN, not a graph changed behind its digest
    onnx.save(proto, str(model))
    out = tmp_path / "out"
    res = _run(cluster_cli, [images, "--k", 2, "--onnx", model, "--out", out])
    _one_line_error(res, 1, "none of the")
    assert all("NaN" in r["reason"] for r in read_csv(out / "skipped.csv"))


def test_stale_staging_folder_of_a_killed_export_is_removed(tmp_path):
    from tiny import random_model, tiny_spec

    from itae_export.onnx.export import export_onnx
    from itae_export.registry import ITAEOptions

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / ".m.abc123.tmp"
    stale.mkdir()
    (stale / STAGING_OWNER).write_text(f"{dead.pid}\n")
    (stale / "m.onnx").write_bytes(b"x" * 1000)
    live = tmp_path / ".m.live99.tmp"
    live.mkdir()
    (live / STAGING_OWNER).write_text(f"{os.getpid()}\n")  # a running export's folder stays
    spec = tiny_spec("dinov2_vits14")
    export_onnx(spec, ITAEOptions(theta=1.0), tmp_path / "m.onnx", model=random_model(spec), validate=False)
    assert not stale.exists() and live.exists()


def test_killed_export_leaves_nothing_at_the_output(tmp_path):
    """SIGKILL in the middle of an export: no model at the output path, and the next export cleans up."""
    code = ("import sys, time; sys.path.insert(0, 'tests')\n"
            "from tiny import random_model, tiny_spec\n"
            "import itae_export.onnx.export as ex\n"
            "from itae_export.registry import ITAEOptions\n"
            "real = ex._torch_export\n"
            "def slow(*a, **k):\n"
            "    r = real(*a, **k); print('EXPORTED', flush=True); time.sleep(60); return r\n"
            "ex._torch_export = slow\n"
            "spec = tiny_spec('dinov2_vits14')\n"
            f"ex.export_onnx(spec, ITAEOptions(theta=1.0), {str(tmp_path / 'k.onnx')!r}, model=random_model(spec))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.readline().strip() == "EXPORTED"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "k.onnx").exists() and not (tmp_path / "k.json").exists()
    assert list(tmp_path.glob(".k.*.tmp"))  # the staging folder it left
    from tiny import random_model, tiny_spec

    from itae_export.onnx.export import export_onnx
    from itae_export.registry import ITAEOptions

    spec = tiny_spec("dinov2_vits14")
    export_onnx(spec, ITAEOptions(theta=1.0), tmp_path / "k.onnx", model=random_model(spec), validate=False)
    assert not list(tmp_path.glob(".k.*.tmp")) and (tmp_path / "k.onnx").is_file()


# ---------------------------------------------------------------- options and resources


@pytest.mark.parametrize("args, needle", [
    (["--n-init", "100000"], "--n-init"),
    (["--threads", "0"], "--threads"),
    (["--max-pixels", "0"], "--max-pixels"),
    (["--k", "x"], "--k"),
])
def test_bad_options_exit_2(images, tiny_model, tmp_path, args, needle):
    base = [images, "--onnx", tiny_model, "--out", tmp_path / "out"]
    res = _run(cluster_cli, base + (args if "--k" in args else ["--k", "2"] + args))
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output


def test_resolution_zero_is_a_usage_error():
    from itae_export.cli.export import main as export_cli

    res = _run(export_cli, ["--model", "vits14", "--resolution", "0"])
    assert res.exit_code == 2 and "--resolution" in res.output


def test_threads_are_capped_by_the_cores_this_process_may_use(images, tiny_model, tmp_path):
    res = _run(cluster_cli, [images, "--k", 2, "--onnx", tiny_model, "--out", tmp_path / "out", "--threads", 10000])
    assert res.exit_code == 0, res.output
    assert "--threads 10000: this process may use" in res.stderr


def test_huge_image_is_skipped_with_a_reason(tmp_path, tiny_model):
    root = _folder(tmp_path / "imgs", 4)
    Image.new("RGB", (3000, 2000), (10, 20, 30)).save(root / "a" / "huge.png")
    out = tmp_path / "out"
    res = _run(cluster_cli, [root, "--k", 2, "--onnx", tiny_model, "--out", out, "--max-pixels", 5_000_000])
    assert res.exit_code == 0, res.output
    skipped = {r["path"]: r["reason"] for r in read_csv(out / "skipped.csv")}
    assert "above --max-pixels 5000000" in skipped["a/huge.png"]


def test_stale_embedding_after_a_copy_that_keeps_the_mtime(images, tiny_model, tmp_path):
    """cp -p / rsync -a keep size and mtime: the changed file must be embedded again."""
    out = tmp_path / "out"
    assert _run(cluster_cli, [images, "--k", 2, "--onnx", tiny_model, "--out", out]).exit_code == 0
    target = images / "a" / "001.png"
    st = target.stat()
    other = tmp_path / "other.png"
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(other)
    data = other.read_bytes()
    old = target.read_bytes()
    target.write_bytes((data + b"\0" * len(old))[: len(old)] if len(data) <= len(old) else data)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p does
    time.sleep(0.01)
    res = _run(cluster_cli, [images, "--k", 2, "--onnx", tiny_model, "--out", out])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["counts"]["embedded_new"] >= 1


def test_inspect_with_a_link_to_a_file_outside_the_folder(tmp_path):
    root = _folder(tmp_path / "imgs", 4)
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(outside)
    (root / "a" / "link.png").symlink_to(outside)
    res = _run(inspect_cli, [root, "--model", "vits14", "--random-weights", "--max-images", 5,
                             "--out", tmp_path / "insp"])
    assert "Traceback" not in res.output and res.exit_code in (0, 1), res.output
