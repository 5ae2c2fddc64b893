"""itae-inspect and itae-search --image on the one source layer: a folder, a path list and WebDataset
tars of the same images give the same norms; any file name (non-UTF-8 bytes included) works; an image
that cannot be read is named with its reason; bad query images give one line."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from itae_export.calibrate.inspection import compute_norms, load_inspect_model, pick_items
from itae_export.cli.inspect import main as inspect_cli
from PIL import Image
from tiny import tiny_spec

BAD = os.fsdecode(b"latin1-\xe9t\xe9.png")  # not valid UTF-8: names are bytes on Linux
BROKEN = "broken.png"  # not an image
BIG = "big.png"  # 100 x 100 pixels: above --max-pixels 5000, the others (40 x 40) are below
N = 10
KINDS = ("folder", "txt", "csv", "tar")


def small_spec(name, resolution=56):
    spec = tiny_spec(name, depth=2)
    return dataclasses.replace(spec, preprocessing=dataclasses.replace(spec.preprocessing, resolution=resolution))


@pytest.fixture(autouse=True)
def tiny_registry(monkeypatch):
    """The CLI resolves registry names; swap in the tiny architecture of the same family."""
    monkeypatch.setattr("itae_export.calibrate.inspection.get_model_spec", lambda name: small_spec(name))


def _photos(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(N):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "a" / BAD)
    Image.fromarray(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(root / "a" / BIG)
    (root / "a" / BROKEN).write_bytes(b"this is not an image")
    return root


def _source(kind: str, tmp: Path) -> Path:
    root = _photos(tmp / "photos")
    rel = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    if kind == "folder":
        return root
    if kind == "txt":
        lst = tmp / "list.txt"
        lst.write_bytes(b"\n".join(os.fsencode(f"photos/{r}") for r in rel) + b"\n")
        return lst
    if kind == "csv":
        lst = tmp / "list.csv"
        lst.write_bytes(b"path\n" + b"\n".join(os.fsencode(f"photos/{r}") for r in rel) + b"\n")
        return lst
    tar = tmp / "photos.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT, errors="surrogateescape") as tf:
        for r in rel:
            tf.add(root / r, arcname=r)
    return tar


def _name(key: str) -> str:
    """The image's own name, whatever the source prefixes (folder-relative, list entry, <tar>/<sample>)."""
    return os.path.splitext(key.rsplit("/", 1)[-1])[0]


@pytest.fixture(scope="module")
def model():
    return load_inspect_model(small_spec("dinov2_vits14_reg"), random_weights=True)


def test_norms_identical_across_sources(model, tmp_path):
    """The same images as a folder, a .txt list, a .csv list and a tar: the same keys skipped for the
    same reasons, and bit-identical norms per image."""
    got = {}
    for kind in KINDS:
        location, items = pick_items(_source(kind, tmp_path / kind), None)
        sample = compute_norms(model, Path(location), items, batch_size=4, max_pixels=5000)
        assert len(sample.paths) == N + 1, (kind, sample.paths)  # the non-UTF-8 name included
        assert BAD.rsplit(".", 1)[0] in {_name(k) for k in sample.paths}, (kind, sample.paths)
        reasons = {_name(k): r for k, r in sample.skipped}
        assert set(reasons) == {"broken", "big"}, (kind, sample.skipped)
        assert "max-pixels 5000" in reasons["big"], reasons
        got[kind] = (dict(zip(map(_name, sample.paths), sample.norms)), reasons)
    ref_norms, ref_reasons = got["folder"]
    for kind in KINDS[1:]:
        norms, reasons = got[kind]
        assert reasons == ref_reasons, kind
        assert norms.keys() == ref_norms.keys(), kind
        for k in ref_norms:
            np.testing.assert_array_equal(norms[k], ref_norms[k], err_msg=f"{kind}: {k}")


@pytest.mark.parametrize("kind", KINDS)
def test_cli_reads_every_source(kind, tmp_path):
    """itae-inspect on each kind of input: exit 0, the non-UTF-8 name counted, the unreadable images
    named with their reason on stderr and in inspect.json; the same numbers as on the folder."""
    src = _source(kind, tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(inspect_cli, [str(src), "--model", "vits14_reg", "--random-weights", "--max-images",
                                           "100", "--max-pixels", "5000", "--out", str(out)])
    assert res.exit_code == 0 and res.exception is None, res.output
    written = json.loads((out / "inspect.json").read_text())
    assert written["images"] == N + 1
    skipped = {_name(s["path"]): s["reason"] for s in written["skipped"]}
    assert set(skipped) == {"broken", "big"}, written["skipped"]
    assert "skipped 2 images that could not be read" in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("  ")]
    assert any("broken" in ln and skipped["broken"] in ln for ln in lines), res.stderr
    assert any("big" in ln and "max-pixels 5000" in ln for ln in lines), res.stderr
    if kind != "folder":  # the same images give the same counts as the folder
        ref = tmp_path / "ref"
        again = CliRunner().invoke(inspect_cli, [str(_photos(tmp_path / "ref_photos")), "--model", "vits14_reg",
                                                 "--random-weights", "--max-images", "100", "--max-pixels", "5000",
                                                 "--out", str(ref)])
        assert again.exit_code == 0, again.output
        folder = json.loads((ref / "inspect.json").read_text())
        for field in ("counts", "suggested_theta", "per_image_artifacts"):
            assert written[field] == folder[field], field


def test_cli_attention_on_a_tar(tmp_path):
    """The attention maps decode tar members (no file of that name exists) with the same code."""
    src = _source("tar", tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(inspect_cli, [str(src), "--model", "vits14_reg", "--random-weights", "--attention",
                                           "--attention-backend", "torch", "--attention-images", "3",
                                           "--max-images", "5", "--out", str(out)])
    assert res.exit_code == 0 and res.exception is None, res.output
    written = json.loads((out / "inspect.json").read_text())
    assert len(written["attention"]["images"]) == 3
    assert all(p.startswith("photos.tar/") for p in written["attention"]["images"]), written["attention"]


def test_default_out_beside_a_list(tmp_path):
    """Without --out: <input>_inspect/ beside the input (list.txt -> list_inspect/)."""
    src = _source("txt", tmp_path)
    res = CliRunner().invoke(inspect_cli, [str(src), "--model", "vits14_reg", "--random-weights", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "list_inspect" / "inspect.json").is_file()


def test_output_inside_the_folder_is_not_read(tmp_path):
    """--out inside the input folder: a second run does not take the first run's pictures as input."""
    src = _source("folder", tmp_path)
    out = src / "inspect"
    for _ in range(2):
        res = CliRunner().invoke(inspect_cli, [str(src), "--model", "vits14_reg", "--random-weights", "-q",
                                               "--max-images", "100", "--out", str(out)])
        assert res.exit_code == 0, res.output
        written = json.loads((out / "inspect.json").read_text())
        assert written["images"] == N + 2 and len(written["skipped"]) == 1, written["skipped"]


@pytest.mark.parametrize("what", ["missing", "empty folder", "all broken"])
def test_cli_bad_input_one_line(what, tmp_path):
    if what == "missing":
        src = tmp_path / "nope"
    else:
        src = tmp_path / "photos"
        src.mkdir()
        if what == "all broken":
            (src / BROKEN).write_bytes(b"not an image")
            (src / BAD).write_bytes(b"not an image either")
    res = CliRunner().invoke(inspect_cli, [str(src), "--model", "vits14_reg", "--random-weights", "-q"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.exception, res.output)
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and str(src) in errors[0], res.output


# ---------------------------------------------------------------- itae-search --image


def _search(collection, image, *extra):
    from itae_export.cli.search import main as search_cli

    return CliRunner().invoke(search_cli, ["query", str(collection), "--image", str(image), "-k", "3", *extra])


def _probe(collection, dest: Path) -> Path:
    """A copy of an image of the collection at ``dest``: its own row ranks first."""
    rows = list(csv.DictReader(open(collection / "assignments.csv")))
    root = Path(json.loads((collection / "summary.json").read_text())["folder"])
    dest.write_bytes((root / rows[5]["path"]).read_bytes())
    return dest


def test_search_image_with_a_non_utf8_name(collection, tmp_path):
    probe = _probe(collection, tmp_path / BAD)
    res = _search(collection, probe)
    assert res.exit_code == 0 and res.exception is None, res.output
    rows = list(csv.DictReader(open(collection / "assignments.csv")))
    first = next(csv.DictReader(res.stdout.splitlines()))
    assert first["path"] == rows[5]["path"] and float(first["score"]) > 0.9999, res.stdout


@pytest.mark.parametrize("what", ["non-UTF-8 non-image", "too large", "not an image", "missing"])
def test_search_bad_image_one_line(what, collection, tmp_path):
    extra = ()
    if what == "too large":
        img = tmp_path / "big.png"
        Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(img)
        extra, needle = ("--max-pixels", "5000"), "above --max-pixels 5000"
    elif what == "missing":
        img, needle = tmp_path / "nope.png", "no such file"
    else:
        img = tmp_path / (BAD if what.startswith("non-UTF-8") else "notes.png")
        img.write_bytes(b"not an image")
        needle = "not an image PIL can identify"
    res = _search(collection, img, *extra)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.exception, res.output)
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: --image: ") and needle in errors[0], res.output
    assert img.name.split("-")[0] in errors[0], res.output  # the file is named (its valid UTF-8 part at least)
    if what.startswith("non-UTF-8"):  # a real process: its stderr is strict UTF-8, not the runner's buffer
        proc = subprocess.run([sys.executable, "-m", "itae_export.cli.search", "query", str(collection), "--image",
                               str(img)], capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
        err = proc.stderr.decode("utf-8")  # valid UTF-8: the name's other bytes written as \xNN
        assert proc.returncode == 1 and "Traceback" not in err, err
        assert [ln for ln in err.splitlines() if ln.startswith("Error:")] == [
            "Error: --image: " + str(img.parent) + "/latin1-\\xe9t\\xe9.png: " + needle], err


@pytest.mark.parametrize("kind", KINDS)
def test_theta_auto_reads_every_source(kind, tmp_path):
    """--theta auto calibrates on the command's own input, whatever its kind (itae-cluster photos.tar
    --theta auto): the same images counted as from the folder."""
    from itae_export.calibrate.auto import calibrate_theta
    from tiny import random_model

    spec = small_spec("dinov2_vits14_reg")
    lines = []
    calibrate_theta(spec, _source(kind, tmp_path), random_model(spec), log=lines.append)
    assert any(f"the {N + 2} images of" in ln or f"from {N + 2} images" in ln for ln in lines), lines  # not broken.png
