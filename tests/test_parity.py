"""Fidelity against independent implementations, on random weights of the real architectures, at 224x224.

Each reference (official dinov2, transformers, timm, open_clip) writes its state dict in its own
native format; OUR loader reads that file (``load_model(..., weights=path)``), and our embedding is
compared with the reference's own forward.

Error definition: ``rel = max|ours - ref| / max|ref|`` over the CLS embedding, required <= 1e-5.

Position tables: the official DINOv2 models carry a 37x37 grid and interpolate it to 16x16 at 224.
The implementations do this differently, and each test pins the rule of its reference:
- official dinov2 (no registers): ``scale_factor=(16.1/37)``, bicubic -> ``dinov2-offset``;
- transformers ``Dinov2Model``: ``size=(16, 16)``, bicubic, no antialias -> ``bicubic``. This
  DEVIATES from the official model (and is what the HF hub weights compute in transformers);
- transformers ``Dinov2WithRegistersModel``, timm, open_clip: ``size=...`` with antialias ->
  ``bicubic-aa`` (the official ``*_reg`` rule).
Each pinned rule is also shown to matter: the wrong rule misses the reference by far more than
the tolerance.

Sizes: ViT-S/14 at full size for the DINOv2 families; open_clip ViT-B/16 at full size once;
DeiT III B/16 at full width, depth 4; transformers' CLIP at a reduced width/depth (same code path); the SwiGLU giant
block at width 64.
"""

from __future__ import annotations

import dataclasses

import pytest
import refimpl as R
import torch
from tiny import tiny_spec

from itae_export.model.vit import interpolate_pos_table
from itae_export.registry import get_model_spec
from itae_export.weights.checkpoints import load_model

TOL = 1e-5
_deit = get_model_spec("deit3_base16")
DEIT3_B16_DEPTH4 = dataclasses.replace(_deit, name="deit3_base16_depth4", arch=dataclasses.replace(_deit.arch, depth=4))
X = R.images(2)


def _cls(model, x=X) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(x)["embedding"]


def _assert_rule_matters(model, wrong_rule: str, ref_out: torch.Tensor) -> None:
    model.pos_rule = wrong_rule  # the same loaded weights, the other interpolation
    err = R.rel_err(_cls(model), ref_out)
    assert err > 100 * TOL, f"rule {wrong_rule} should not match the reference (rel {err:.2g})"


def test_official_dinov2_vits14(tmp_path):
    ref = R.official_dinov2("small")
    path = R.save_torch(ref.state_dict(), tmp_path / "dinov2_vits14_pretrain.pth")
    model, loaded = load_model("dinov2_vits14", None, weights=path)
    assert loaded.format == "dinov2-hub" and loaded.pos_rule == "dinov2-offset"
    with torch.no_grad():
        want = ref.forward_features(X)
    with torch.no_grad():
        got = model.forward_features(X)
    err = R.rel_err(got["embedding"], want["x_norm_clstoken"])
    print(f"official dinov2 ViT-S/14: rel {err:.3g}")
    assert err <= TOL
    assert R.rel_err(got["x_norm_patchtokens"], want["x_norm_patchtokens"]) <= TOL
    # the offset rule and the plain size rule really differ, by far more than rounding
    grid = ref.pos_embed[:, 1:].reshape(1, 37, 37, -1).detach()
    d = (interpolate_pos_table(grid, 16, 16, "dinov2-offset") - interpolate_pos_table(grid, 16, 16, "bicubic")).abs().max()
    assert d > 1e-3 * grid.abs().max()
    _assert_rule_matters(model, "bicubic", want["x_norm_clstoken"])


def test_hf_dinov2_vits14(tmp_path):
    # transformers' Dinov2Model interpolates with size=(16,16) (no +0.1 offset): NOT the official rule.
    # The loader pins 'bicubic' for HF weights so that it reproduces what transformers computes.
    ref = R.hf_dinov2(registers=False)
    path = R.save_hf(ref, tmp_path / "hf")
    model, loaded = load_model("dinov2_vits14", None, weights=path)
    assert loaded.format == "hf-dinov2" and loaded.pos_rule == "bicubic"
    with torch.no_grad():
        want = ref(pixel_values=X).last_hidden_state
    got = model.forward_features(X)["x_norm"].detach()
    err = R.rel_err(got[:, 0], want[:, 0])
    print(f"transformers Dinov2Model ViT-S/14: rel {err:.3g}")
    assert err <= TOL and R.rel_err(got, want) <= TOL
    _assert_rule_matters(model, "dinov2-offset", want[:, 0])


def test_hf_dinov2_with_registers_vits14(tmp_path):
    ref = R.hf_dinov2(registers=True)
    path = R.save_hf(ref, tmp_path / "hf_reg")
    model, loaded = load_model("dinov2_vits14_reg", None, weights=path)
    assert loaded.format == "hf-dinov2" and loaded.pos_rule == "bicubic-aa"
    with torch.no_grad():
        want = ref(pixel_values=X).last_hidden_state[:, 0]
    err = R.rel_err(_cls(model), want)
    print(f"transformers Dinov2WithRegistersModel ViT-S/14: rel {err:.3g}")
    assert err <= TOL
    _assert_rule_matters(model, "bicubic", want)


def test_hf_dinov2_swiglu_giant_block(tmp_path):
    # ViT-g/14's SwiGLU FFN (on disk: mlp.weights_in / weights_out) at width 64, depth 2
    spec = tiny_spec("dinov2_vitg14")
    ref = R.hf_dinov2(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, use_swiglu_ffn=True)
    path = R.save_hf(ref, tmp_path / "hf_g")
    model, loaded = load_model(spec, None, weights=path)
    with torch.no_grad():
        want = ref(pixel_values=X).last_hidden_state[:, 0]
    err = R.rel_err(_cls(model), want)
    print(f"transformers Dinov2Model SwiGLU (width 64): rel {err:.3g}")
    assert err <= TOL


def test_timm_dinov2_reg4_vits14(tmp_path):
    # timm at img_size=518 (the 37x37 grid), resampled on the fly (dynamic_img_size) with antialias;
    # timm's checkpoint has no CLS row in pos_embed (folded into cls_token) and no mask token
    ref = R.timm_model("vit_small_patch14_reg4_dinov2", img_size=518, dynamic_img_size=True)
    path = R.save_torch(ref.state_dict(), tmp_path / "timm_reg4.pth")
    model, loaded = load_model("dinov2_vits14_reg", None, weights=path)
    assert loaded.format == "timm" and loaded.pos_rule == "bicubic-aa"
    with torch.no_grad():
        want = ref.forward_features(X)[:, 0]
    err = R.rel_err(_cls(model), want)
    print(f"timm vit_small_patch14_reg4_dinov2: rel {err:.3g}")
    assert err <= TOL
    _assert_rule_matters(model, "bicubic", want)


def test_timm_and_official_deit3_base16(tmp_path):
    ref = R.timm_model("deit3_base_patch16_224", depth=4)  # real width 768, depth cut to 4 for time
    sd = ref.state_dict()
    timm_path = R.save_torch(sd, tmp_path / "deit3_timm.pth")
    official_path = tmp_path / "deit_3_base_224_21k.pth"
    torch.save(R.deit_official_state_dict(sd), official_path)
    with torch.no_grad():
        want = ref.forward_features(X)[:, 0]
    for path, fmt in ((timm_path, "timm"), (official_path, "deit-official")):
        model, loaded = load_model(DEIT3_B16_DEPTH4, None, weights=path)
        assert loaded.format == fmt
        err = R.rel_err(_cls(model), want)
        print(f"DeiT III B/16 via {fmt}: rel {err:.3g}")
        assert err <= TOL


def test_open_clip_vitb16(tmp_path):
    visual = R.open_clip_visual("ViT-B-16-quickgelu")
    # the layout of a full open_clip / OpenAI CLIP state dict: visual.* beside the text tower
    sd = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    sd["logit_scale"] = torch.tensor(4.6)
    sd["token_embedding.weight"] = torch.zeros(8, 512)
    path = R.save_torch(sd, tmp_path / "open_clip_b16.pt")
    model, loaded = load_model("clip_vitb16", None, weights=path)
    assert loaded.format == "open-clip"
    with torch.no_grad():
        want = visual(X)
    err = R.rel_err(_cls(model), want)
    print(f"open_clip ViT-B-16 visual: rel {err:.3g}")
    assert err <= TOL


def test_hf_clip_vision_with_projection(tmp_path):
    ref = R.hf_clip_vision()  # a ViT-B/16-shaped CLIP tower at width 384, depth 4
    c = ref.config
    base = get_model_spec("clip_vitb16")
    spec = dataclasses.replace(base, name="clip_b16_reduced", arch=dataclasses.replace(
        base.arch, embed_dim=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
        mlp_hidden=c.intermediate_size, proj_dim=c.projection_dim))
    path = R.save_hf(ref, tmp_path / "hf_clip")
    model, loaded = load_model(spec, None, weights=path)
    assert loaded.format == "hf-clip"
    with torch.no_grad():
        want = ref(pixel_values=X).image_embeds
    err = R.rel_err(_cls(model), want)
    print(f"transformers CLIPVisionModelWithProjection: rel {err:.3g}")
    assert err <= TOL


@pytest.mark.parametrize("rule", ["dinov2-offset", "bicubic", "bicubic-aa"])
def test_rules_are_distinct(rule):
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(1, 37, 37, 8, generator=g)
    others = [r for r in ("dinov2-offset", "bicubic", "bicubic-aa") if r != rule]
    mine = interpolate_pos_table(grid, 16, 16, rule)
    for other in others:
        assert (mine - interpolate_pos_table(grid, 16, 16, other)).abs().max() > 1e-2
