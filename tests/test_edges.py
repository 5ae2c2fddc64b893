"""More edges of issue 12, each a test that failed before its fix."""

import json
import os
import stat
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from itae_export.cli.cluster import main as cluster_cli
from PIL import Image

from itae_export.onnx.identity import model_fingerprint
from itae_export.images import scan_images


def _folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


def test_outputs_follow_the_umask_not_0600(tmp_path, tiny_model):
    root = _folder(tmp_path / "imgs", 6)
    old = os.umask(0o022)
    try:
        res = CliRunner().invoke(cluster_cli, [str(root), "--k", "2", "--onnx", str(tiny_model), "--out",
                                               str(tmp_path / "out")])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    for name in ("summary.json", "assignments.csv", "embeddings.npy", "skipped.csv"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name


def test_reexporting_the_same_model_keeps_its_fingerprint(tmp_path):
    """The export's creation time must not be part of the model identity: the embeddings stay valid."""
    from tiny import random_model, tiny_spec

    from itae_export.onnx.export import export_onnx
    from itae_export.registry import ITAEOptions

    spec = tiny_spec("dinov2_vits14")
    a = export_onnx(spec, ITAEOptions(theta=1.0), tmp_path / "a.onnx", model=random_model(spec), validate=False)
    b = export_onnx(spec, ITAEOptions(theta=1.0), tmp_path / "b.onnx", model=random_model(spec), validate=False)
    assert a.manifest["created"] != "" and a.path != b.path
    assert model_fingerprint(a.path) == model_fingerprint(b.path)
    c = export_onnx(spec, ITAEOptions(theta=1.0), tmp_path / "c.onnx", model=random_model(spec, seed=1),
                    validate=False)
    assert model_fingerprint(c.path) != model_fingerprint(a.path)  # other weights: another model


def test_sibling_links_to_one_folder_resolve_the_same_way(tmp_path):
    real = _folder(tmp_path / "real", 2)
    root = tmp_path / "root"
    root.mkdir()
    for name in ("zz", "aa", "mm"):
        (root / name).symlink_to(real, target_is_directory=True)
    found = {p.relative_to(root).parts[0] for p in scan_images(root)}
    assert found == {"aa"}  # the first in byte order, whatever the directory order


def test_temi_on_a_few_images(tmp_path, tiny_model):
    """TEMI's 50 neighbours on 40 images used to fail with no flag to help: now the graph shrinks."""
    root = _folder(tmp_path / "imgs", 40)
    out = tmp_path / "out"
    res = CliRunner().invoke(cluster_cli, [str(root), "--k", "2", "--onnx", str(tiny_model), "--out", str(out),
                                           "--method", "temi", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["head"]["hparams"]["n_neighbors"] == 39


def test_validate_from_another_directory_finds_the_weights(tmp_path, monkeypatch):
    """The manifest records --weights as an absolute path, so itae-validate works from anywhere."""
    import torch
    from tiny import random_model, tiny_spec

    import itae_export.onnx.export as export_mod
    from itae_export.registry import ITAEOptions

    spec = tiny_spec("dinov2_vits14")
    (tmp_path / "w").mkdir()
    torch.save(random_model(spec).state_dict(), tmp_path / "w" / "tiny.pth")
    monkeypatch.chdir(tmp_path / "w")
    r = export_mod.export_onnx(spec, ITAEOptions(theta=1.0), tmp_path / "m.onnx", weights="tiny.pth",
                               validate=False)
    assert Path(r.manifest["weights"]["source"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    report = export_mod.revalidate(tmp_path / "m.onnx")
    assert report["passed"]
