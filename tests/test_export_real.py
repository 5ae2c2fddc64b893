"""Real-size architectures with random weights written in their official formats, through the CLI."""

import json

import numpy as np
import pytest
import refimpl
from click.testing import CliRunner
from itae_export.cli import export as export_cli
from itae_export.cli import validate as validate_cli
from tiny import theta_for_varied_artifacts

from itae_export.onnx.export import export_onnx
from itae_export.registry import ITAEOptions, get_model_spec
from itae_export.weights.checkpoints import load_model

pytestmark = pytest.mark.slow


def _theta(name, weights):
    model, _ = load_model(name, None, weights=weights)
    spec = get_model_spec(name)
    return theta_for_varied_artifacts(model, spec)


def _check(manifest, fmt, pos_rule):
    v = manifest["validation"]
    assert v["passed"], v["failure"]
    assert v["rel_max_abs_diff"] <= 1e-4 and v["mask_mismatch"] == 0
    assert set(v["batch_sizes"]) == {"1", "3"} and all(b["passed"] for b in v["batch_sizes"].values())
    assert len(set(v["artifacts_per_input"])) > 1, v["artifacts_per_input"]
    assert manifest["weights"]["format"] == fmt and len(manifest["weights"]["sha256"]) == 64
    assert manifest["pos_rule"] == pos_rule


def test_cli_exports_vits14_from_official_hub_checkpoint(tmp_path):
    # the official dinov2 code's own state dict: exactly the hub .pth layout
    ckpt = refimpl.save_torch(refimpl.official_dinov2("small", seed=5).state_dict(), tmp_path / "dinov2_vits14_pretrain.pth")
    theta = _theta("dinov2_vits14", ckpt)
    out = tmp_path / "vits14.onnx"
    res = CliRunner().invoke(export_cli.main, ["--model", "vits14", "--weights", ckpt, "--theta", f"{theta:.6f}",
                                               "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(out)
    manifest = json.loads(out.with_suffix(".json").read_text())
    _check(manifest, "dinov2-hub", "dinov2-offset")
    assert manifest["num_tokens"] == 257 and manifest["model"] == "dinov2_vits14"
    # itae-validate runs the same comparison again later, from the manifest alone
    res = CliRunner().invoke(validate_cli.main, [str(out)])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output


def test_exports_vits14_reg_from_hub_layout(tmp_path):
    from tiny import random_model

    spec = get_model_spec("dinov2_vits14_reg")
    sd = random_model(spec, seed=6).state_dict()  # official names incl. register_tokens and mask_token
    ckpt = refimpl.save_torch(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    theta = _theta(spec.name, ckpt)
    r = export_onnx(spec, ITAEOptions(theta=theta), tmp_path / "reg.onnx", weights=ckpt)
    _check(r.manifest, "dinov2-hub", "bicubic-aa")
    assert r.manifest["num_tokens"] == 261


def test_exports_clip_vitb16_from_hugging_face_dir(tmp_path):
    hf = refimpl.hf_clip_vision(seed=7, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072, projection_dim=512)
    d = refimpl.save_hf(hf, tmp_path / "clip-vit-base-patch16")
    theta = _theta("clip_vitb16", d)
    r = export_onnx("clip_vitb16", ITAEOptions(theta=theta), tmp_path / "clip.onnx", weights=d)
    v = r.manifest["validation"]
    assert v["passed"] and v["mask_mismatch"] == 0 and len(set(v["artifacts_per_input"])) > 1
    assert r.manifest["embed_dim"] == 512 and r.manifest["num_tokens"] == 197
    assert r.manifest["weights"]["format"].startswith("hf")
    assert np.allclose(r.manifest["preprocessing"]["mean"], [0.48145466, 0.4578275, 0.40821073])
