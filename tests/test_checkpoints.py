"""Checkpoint reading: format detection, strict errors, wrong architectures, safety, downloads, sha256.

Tiny models (width 64, depth 2) throughout; real-size parity lives in test_parity.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import urllib.error
import zipfile

import pytest
import refimpl as R
import torch
from tiny import tiny_spec

from itae_export.errors import CheckpointError, DownloadError
from itae_export.model.vit import VisionTransformer, build_model, init_random_
from itae_export.registry import ITAEOptions, get_model_spec
from itae_export.weights import hub
from itae_export.weights.checkpoints import (
    check_architecture,
    convert_state_dict,
    default_pos_rule,
    detect_format,
    load_model,
    read_checkpoint,
    sha256_file,
)

TOL = 1e-5
X = R.images(2)
TINY = tiny_spec("dinov2_vits14")
TINY_REG = tiny_spec("dinov2_vits14_reg")
TINY_CLIP = tiny_spec("clip_vitb16")
TINY_HF = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def _ours(spec=TINY, seed=0):
    return init_random_(build_model(spec, None), seed=seed)


def _emb(model, x=X):
    with torch.no_grad():
        return model.forward_features(x)["embedding"]


# ---------------------------------------------------------------- formats


def test_official_layout_roundtrip_and_sha256(tmp_path):
    ref = _ours()
    path = R.save_torch(ref.state_dict(), tmp_path / "w.pth")
    raw, fmt = read_checkpoint(path)
    assert fmt == "dinov2-hub" and default_pos_rule(fmt, TINY) == "dinov2-offset"
    model, loaded = load_model(TINY, None, weights=path)
    assert torch.equal(_emb(model), _emb(ref))
    assert loaded.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest() == sha256_file(path)
    assert loaded.source == str(path)


def test_itae_injected_model_loads_same_names(tmp_path):
    path = R.save_torch(_ours().state_dict(), tmp_path / "w.pth")
    plain, _ = load_model(TINY, ITAEOptions(enabled=False), weights=path)
    patched, _ = load_model(TINY, ITAEOptions(theta=0.0), weights=path)
    assert set(plain.state_dict()) == set(patched.state_dict())


def test_hf_dinov2_prefixes_heads_and_in_memory_layout(tmp_path):
    from safetensors.torch import save_file

    ref = R.hf_dinov2(**TINY_HF)
    disk = R.save_hf(ref, tmp_path / "hf")
    want = ref(pixel_values=X).last_hidden_state[:, 0].detach()
    m0, l0 = load_model(TINY, None, weights=disk)
    assert l0.format == "hf-dinov2" and R.rel_err(_emb(m0), want) <= TOL
    # Dinov2ForImageClassification-style: "dinov2." prefix plus a classifier, one .safetensors file
    raw, _ = read_checkpoint(disk)
    sd = {f"dinov2.{k}": v.contiguous() for k, v in raw.items()}
    sd["classifier.weight"] = torch.zeros(10, 128)
    save_file(sd, str(tmp_path / "cls.safetensors"))
    m1, _ = load_model(TINY, None, weights=tmp_path / "cls.safetensors")
    assert torch.equal(_emb(m1), _emb(m0))
    # transformers 5 in-memory names (attention.q_proj, o_proj), saved as a plain pytorch_model.bin
    (tmp_path / "mem").mkdir()
    torch.save(ref.state_dict(), tmp_path / "mem" / "pytorch_model.bin")
    assert any(".q_proj." in k for k in ref.state_dict())
    m2, _ = load_model(TINY, None, weights=tmp_path / "mem")
    assert torch.equal(_emb(m2), _emb(m0))


def test_hf_dinov2_sharded_index(tmp_path):
    ref = R.hf_dinov2(**TINY_HF)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model, loaded = load_model(TINY, None, weights=tmp_path / "sharded")
    want = ref(pixel_values=X).last_hidden_state[:, 0].detach()
    assert R.rel_err(_emb(model), want) <= TOL
    assert len(loaded.sha256) == 64


def test_hf_clip_model_drops_text_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    vc = dict(**TINY_HF, intermediate_size=256, image_size=224, patch_size=16, hidden_act="quick_gelu")
    torch.manual_seed(0)
    ref = R.randomize_(CLIPModel(CLIPConfig(vision_config=vc, text_config=dict(hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64), projection_dim=32))).eval()
    path = R.save_hf(ref, tmp_path / "clip")
    model, loaded = load_model(TINY_CLIP, None, weights=path)
    assert loaded.format == "hf-clip" and loaded.pos_rule == "bicubic"
    with torch.no_grad():
        out = ref.get_image_features(pixel_values=X)
        want = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert R.rel_err(_emb(model), want) <= TOL


def test_hf_clip_old_hub_layout_and_missing_projection(tmp_path):
    from safetensors.torch import save_file

    ref = R.hf_clip_vision(**TINY_HF, intermediate_size=256, projection_dim=32)
    raw, _ = read_checkpoint(R.save_hf(ref, tmp_path / "v"))
    assert "vision_model.embeddings.patch_embedding.weight" in raw
    old = dict(raw)
    old["vision_model.embeddings.position_ids"] = torch.arange(197)[None]  # as in the 2021 hub files
    save_file(old, str(tmp_path / "old.safetensors"))
    model, _ = load_model(TINY_CLIP, None, weights=tmp_path / "old.safetensors")
    assert R.rel_err(_emb(model), ref(pixel_values=X).image_embeds.detach()) <= TOL
    # CLIPVisionModel (transformers 5 saves it without the vision_model. prefix) has no projection
    no_proj = {k[len("vision_model."):]: v for k, v in raw.items() if k.startswith("vision_model.")}
    save_file(no_proj, str(tmp_path / "noproj.safetensors"))
    with pytest.raises(CheckpointError, match=r"noproj\.safetensors.*proj_dim=None"):
        load_model(TINY_CLIP, None, weights=tmp_path / "noproj.safetensors")


def test_open_clip_state_dict_and_openai_torchscript(tmp_path):
    visual = R.open_clip_visual("ViT-B-16-quickgelu", width=64, layers=2, head_width=16)  # 4 heads
    spec = dataclasses.replace(TINY_CLIP, arch=dataclasses.replace(TINY_CLIP.arch, proj_dim=512))
    want = visual(X).detach()
    # open_clip: the visual tower's own state dict (no prefix)
    m0, l0 = load_model(spec, None, weights=R.save_torch(visual.state_dict(), tmp_path / "oc.pt"))
    assert l0.format == "open-clip" and R.rel_err(_emb(m0), want) <= TOL
    # OpenAI: a TorchScript archive (torch.load(weights_only=True) refuses it); our restricted reader reads it
    ts = R.save_openai_torchscript(visual, tmp_path / "ViT-B-16.pt")
    raw, fmt = read_checkpoint(ts)
    assert fmt == "openai-clip" and "visual.conv1.weight" in raw and "logit_scale" in raw
    m1, l1 = load_model(spec, None, weights=ts)
    assert l1.format == "openai-clip" and R.rel_err(_emb(m1), want) <= TOL


def test_timm_formats_and_own_pos_grid(tmp_path):
    timm = R.import_timm()
    ref = R.randomize_(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                                         img_size=224, embed_dim=64, depth=2, num_heads=4)).eval()
    path = R.save_torch(ref.state_dict(), tmp_path / "t.pth")
    raw, fmt = read_checkpoint(path)
    assert fmt == "timm" and "reg_token" in raw and raw["pos_embed"].shape[1] == 256
    model, _ = load_model(TINY_REG, None, weights=path)
    assert model.cfg.pos_grid == 16  # the checkpoint's own grid (timm built at 224)
    assert R.rel_err(_emb(model), ref.forward_features(X)[:, 0].detach()) <= TOL


# ---------------------------------------------------------------- errors


def test_strict_errors_name_keys(tmp_path):
    sd = _ours().state_dict()
    missing = dict(sd)
    del missing["blocks.1.attn.proj.weight"]
    with pytest.raises(CheckpointError, match=r"m\.pth: missing keys: blocks\.1\.attn\.proj\.weight$"):
        load_model(TINY, None, weights=R.save_torch(missing, tmp_path / "m.pth"))
    extra = dict(sd, **{f"blocks.0.extra{i}": torch.zeros(1) for i in range(20)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.0\.extra0, .*\(12 more\)"):
        load_model(TINY, None, weights=R.save_torch(extra, tmp_path / "x.pth"))
    bad = dict(sd)
    bad["blocks.0.mlp.fc1.weight"] = torch.zeros(100, 64)
    with pytest.raises(CheckpointError, match=r"shape mismatches .*blocks\.0\.mlp\.fc1\.weight \(100, 64\) vs \(256, 64\)"):
        load_model(TINY, None, weights=R.save_torch(bad, tmp_path / "s.pth"))


def test_wrong_architecture_is_named(tmp_path):
    path = R.save_torch(_ours().state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match=r"tiny\.pth: the checkpoint's architecture does not match model dinov2_vits14: .*embed_dim=64"):
        load_model("dinov2_vits14", None, weights=path)
    # a ViT-B/14 file for vits14 (meta tensors: no memory) is recognised as vitb14
    with torch.device("meta"):
        vitb = VisionTransformer(get_model_spec("dinov2_vitb14").arch)
    with pytest.raises(CheckpointError, match=r"embed_dim=768.*needs embed_dim=384.*looks like dinov2_vitb14"):
        check_architecture(vitb.state_dict(), get_model_spec("dinov2_vits14"), "vitb.pth")


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth: no such file"):
        read_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        read_checkpoint(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: cannot read as safetensors"):
        read_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        detect_format({"foo.weight": torch.zeros(1)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no model\.safetensors"):
        read_checkpoint(tmp_path / "empty")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickle_with_a_malicious_global_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1), "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to unpickle"):
        read_checkpoint(path)
    assert not os.path.exists(marker)


def test_torchscript_with_a_malicious_global_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    payload = pickle.dumps(_Evil(marker), protocol=2)
    path = tmp_path / "evil_ts.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil_ts/data.pkl", payload)
        z.writestr("evil_ts/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil_ts/code/__torch__.py", "")
    with pytest.raises(CheckpointError, match=r"refused to read the TorchScript archive: global posix\.makedirs|global os\.makedirs"):
        read_checkpoint(path)
    assert not os.path.exists(marker)


# ---------------------------------------------------------------- downloads


def test_offline_download_message(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "hub_checkpoint_dir", lambda: tmp_path / "hub")

    def offline(url, dst):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hub, "_download_url_to_file", offline)
    spec = get_model_spec("dinov2_vits14")
    with pytest.raises(DownloadError) as e:
        load_model(spec, None)
    msg = str(e.value)
    assert "\n" not in msg and spec.url in msg and "--weights PATH" in msg
    assert not list((tmp_path / "hub").glob("*"))  # no partial file left behind
    with pytest.raises(DownloadError, match=r"downloads are off.*--weights PATH"):
        load_model(spec, None, download=False)


def test_hf_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(DownloadError, match=r"https://huggingface.co/facebook/dinov2-small .*--weights PATH"):
        load_model("dinov2_vits14", None, weights="hf", download=False)


def test_cached_official_weights_and_clip_sha_check(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "hub_checkpoint_dir", lambda: tmp_path / "hub")
    (tmp_path / "hub").mkdir()
    ref = _ours()
    cached = hub.cached_path(TINY)
    R.save_torch(ref.state_dict(), cached)
    model, loaded = load_model(TINY, None)  # no download: the cache holds it
    assert loaded.source == TINY.url and loaded.sha256 == sha256_file(cached)
    assert torch.equal(_emb(model), _emb(ref))

    monkeypatch.setattr(hub, "_download_url_to_file", lambda url, dst: open(dst, "wb").write(b"tampered"))
    with pytest.raises(DownloadError, match=r"expected sha256"):
        hub.fetch_official(get_model_spec("clip_vitb16"))
    assert not (tmp_path / "hub" / "ViT-B-16.pt").exists()


def test_convert_is_pure():
    sd = _ours().state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    out = convert_state_dict(sd, "dinov2-hub", TINY)
    assert set(sd) == set(before) and all(torch.equal(sd[k], before[k]) for k in sd)
    assert set(out) == set(sd)
