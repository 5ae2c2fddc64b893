"""itae-export and itae-validate as a user meets them: success, and every kind of bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from itae_export.cli import export as export_cli
from itae_export.cli import validate as validate_cli
from tiny import random_model, tiny_spec

import itae_export.onnx.export as export_mod
import itae_export.weights.checkpoints as checkpoints
from itae_export.weights.checkpoints import LoadedWeights


def _invoke(cmd, args):
    return CliRunner().invoke(cmd.main, args)


@pytest.fixture
def tiny_weights(monkeypatch, tmp_path):
    """Serve a tiny random model for any registry name, so CLI paths run in seconds."""
    spec = tiny_spec("dinov2_vits14")
    path = tmp_path / "tiny.pth"
    torch.save(random_model(spec, seed=3).state_dict(), path)

    def fake_load_model(spec_or_name, itae=None, weights=None, pos_rule=None, download=True):
        from itae_export.model.vit import build_model

        m = build_model(spec, itae, pos_rule=pos_rule or spec.pos_rule)
        m.load_state_dict(torch.load(path, weights_only=True), strict=True)
        return m.eval(), LoadedWeights(format="dinov2-hub", pos_rule=m.pos_rule, source=str(path),
                                       sha256=checkpoints.sha256_file(path), path=str(path))

    monkeypatch.setattr(checkpoints, "load_model", fake_load_model)
    return path


def test_success_writes_model_manifest_inline_and_prints_path(tiny_weights, tmp_path):
    out = tmp_path / "out" / "m.onnx"
    res = _invoke(export_cli, ["--model", "vits14", "--weights", str(tiny_weights), "--theta", "2.5", "--strategy",
                               "mean", "--lsa", "--inline", "--attention-output", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(out)
    assert "validation PASSED" in res.stderr
    assert out.is_file() and out.with_suffix(".json").is_file() and (out.parent / "m.inline.onnx").is_file()
    res = _invoke(validate_cli, [str(out)])
    assert res.exit_code == 0 and "PASSED" in res.output


def test_unknown_model():
    res = _invoke(export_cli, ["--model", "vitx99"])
    assert res.exit_code == 2 and "'--model'" in res.output and "vitx99" in res.output


@pytest.mark.parametrize("theta", ["-1", "abc", "nan", "inf"])
def test_bad_theta(theta):
    res = _invoke(export_cli, ["--model", "vits14", "--theta", theta])
    assert res.exit_code == 2 and "--theta" in res.output


def test_theta_auto_needs_calibration_images():
    res = _invoke(export_cli, ["--model", "vits14", "--theta", "auto"])
    assert res.exit_code == 2 and "--calibration-images" in res.output


def _noise_images(folder, n=6):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_theta_auto_reads_the_checkpoint_once_and_exports_the_calibrated_theta(tiny_weights, tmp_path, monkeypatch):
    import json

    import itae_export.calibrate.theta as theta_mod

    loads, seen = [], []
    real_load = checkpoints.load_model
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))

    def fake_suggest(norms):  # the tiny random model's norms are not bimodal: fix the suggestion
        seen.append(np.asarray(norms).shape)
        return theta_mod.ThetaSuggestion(theta=1.25, confidence=0.9, method="test", bimodal=True)

    monkeypatch.setattr("itae_export.calibrate.auto.suggest_theta", fake_suggest)
    images = _noise_images(tmp_path / "calib")
    out = tmp_path / "m.onnx"
    res = _invoke(export_cli, ["--model", "vits14", "--weights", str(tiny_weights), "--theta", "auto",
                               "--calibration-images", str(images), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "--theta auto: 1.25" in res.stderr and "validation PASSED" in res.stderr
    assert len(loads) == 1, "the checkpoint is read once for the calibration and the export"
    assert seen and seen[0][0] == 6  # the norms of every calibration image
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["itae"]["theta"] == 1.25
    assert manifest["weights"]["sha256"] == checkpoints.sha256_file(tiny_weights)


def test_theta_auto_calibrates_on_a_path_list_and_a_tar(tiny_weights, tmp_path, monkeypatch):
    """--calibration-images takes any input of the source layer, as itae-cluster does."""
    import json
    import tarfile

    import itae_export.calibrate.theta as theta_mod

    seen = []
    monkeypatch.setattr("itae_export.calibrate.auto.suggest_theta", lambda norms: seen.append(len(norms)) or
                        theta_mod.ThetaSuggestion(theta=1.25, confidence=0.9, method="test", bimodal=True))
    images = _noise_images(tmp_path / "calib")
    files = sorted(images.iterdir())
    lst = tmp_path / "calib.txt"
    lst.write_text("".join(f"{f}\n" for f in files))
    tar = tmp_path / "calib.tar"
    with tarfile.open(tar, "w") as t:
        for f in files:
            t.add(f, arcname=f.name)
    for src in (lst, tar):
        out = tmp_path / f"{src.suffix[1:]}.onnx"
        res = _invoke(export_cli, ["--model", "vits14", "--weights", str(tiny_weights), "--theta", "auto",
                                   "--calibration-images", str(src), "-o", str(out)])
        assert res.exit_code == 0, res.output
        manifest = json.loads(out.with_suffix(".json").read_text())
        assert manifest["itae"]["theta"] == 1.25
        validated = manifest["validation"]["inputs"]
        assert sum(str(src) in name or str(images) in name for name in validated) == len(files), validated
    assert seen == [len(files), len(files)]


def test_theta_auto_on_unimodal_norms_exports_without_itae(tiny_weights, tmp_path, monkeypatch):
    """No bimodality: no artifacts to attenuate. --theta auto exports the unpatched model and says so
    in one line (docs/guide.md says the same), instead of refusing or picking a theta in one mode."""
    import json

    import itae_export.calibrate.theta as theta_mod

    monkeypatch.setattr("itae_export.calibrate.auto.suggest_theta", lambda norms: theta_mod.ThetaSuggestion(
        theta=1.0, confidence=0.1, method="test", bimodal=False))
    images = _noise_images(tmp_path / "calib")
    out = tmp_path / "m.onnx"
    res = _invoke(export_cli, ["--model", "vits14", "--weights", str(tiny_weights), "--theta", "auto",
                               "--calibration-images", str(images), "-o", str(out)])
    assert res.exit_code == 0, res.output
    said = [line for line in res.stderr.splitlines() if "no bimodality" in line]
    assert len(said) == 1 and str(images) in said[0] and "ITAE is off" in said[0]
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["itae"]["enabled"] is False


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.pth"
    res = _invoke(export_cli, ["--model", "vits14", "--weights", str(missing), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "nope.pth" in errors[0] and "Traceback" not in res.output
    assert not (tmp_path / "m.onnx").exists()


def test_checkpoint_with_wrong_keys(tmp_path):
    bad = tmp_path / "bad.pth"
    from itae_export.registry import get_model_spec

    sd = random_model(get_model_spec("dinov2_vits14")).state_dict()  # the right architecture, one key renamed
    sd["blocks.0.attn.qkv.weightz"] = sd.pop("blocks.0.attn.qkv.weight")
    torch.save(sd, bad)
    res = _invoke(export_cli, ["--model", "vits14", "--weights", str(bad), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1 and "bad.pth" in res.output
    assert "qkv.weight" in res.output  # the message names the offending keys
    assert "Traceback" not in res.output


def test_failing_validation_exits_nonzero_and_publishes_nothing(tiny_weights, tmp_path, monkeypatch):
    real = export_mod._torch_export

    def corrupted(*args, **kwargs):
        import numpy as np
        import onnx

        proto, location = real(*args, **kwargs)
        init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
        arr = onnx.numpy_helper.to_array(init) * 1.05
        init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
        return proto, location

    monkeypatch.setattr(export_mod, "_torch_export", corrupted)
    out = tmp_path / "m.onnx"
    res = _invoke(export_cli, ["--model", "vits14", "--weights", str(tiny_weights), "-o", str(out)])
    assert res.exit_code == 1 and "validation failed" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pth"]


def test_import_and_help_stay_light():
    code = ("import sys; import itae_export; from itae_export.cli import export, validate, models; "
            "bad = [m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "itae_export.cli.export", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--theta" in proc.stdout
