"""Test helpers: independent reference implementations, and checkpoints written in their native formats.

The references are the upstream code (official ``dinov2``, ``transformers``, ``timm``,
``open_clip``), never our own model. timm and open_clip import torchvision at module level;
:func:`import_timm` / :func:`import_open_clip` put the test-only shim of ``tests/shims`` on
``sys.path`` only when the real torchvision cannot be imported.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

SHIMS = os.path.join(os.path.dirname(__file__), "shims")


def _ensure_torchvision() -> None:
    try:
        import torchvision  # noqa: F401

        return
    except Exception:  # missing, or broken against this torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    if SHIMS not in sys.path:
        sys.path.insert(0, SHIMS)
    import torchvision

    assert getattr(torchvision, "IS_ITAE_TEST_SHIM", False)


def import_timm():
    _ensure_torchvision()
    return importlib.import_module("timm")


def import_open_clip():
    _ensure_torchvision()
    return importlib.import_module("open_clip")


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make every constant-initialised parameter random (LayerNorm 1/0, LayerScale, biases, tokens).

    Upstream inits leave LayerNorms at (1, 0) and LayerScale at a constant, under which a swapped
    norm1/norm2 or a dropped LayerScale would go unnoticed. Random matrices keep their own init.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if not p.is_floating_point() or p.numel() == 0:
            continue
        flat = p.reshape(-1)
        if p.numel() == 1 or bool((flat == flat[0]).all()) or p.ndim == 1 or name.endswith(("token", "embedding", "embed", "embeddings")):
            if float(flat.abs().mean()) > 0.5:  # norm weights, LayerScale ~ 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|: the error relative to the output scale."""
    return float((ours - ref).abs().max() / ref.abs().max())


def images(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


# ------------------------------------------------------------------ references


def official_dinov2(size: str = "small", seed: int = 0):
    """The official dinov2 ViT (2023 code, no registers), img_size 518 (the hub models' 37x37 grid)."""
    from dinov2.models import vision_transformer as vits

    torch.manual_seed(seed)
    m = getattr(vits, f"vit_{size}")(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
    return randomize_(m, seed).eval()


def hf_dinov2(registers: bool = False, seed: int = 0, **overrides):
    """transformers Dinov2Model / Dinov2WithRegistersModel, ViT-S/14 config of the hub models by default."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, image_size=518,
               patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6)
    cfg.update(overrides)
    torch.manual_seed(seed)
    if registers:
        m = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **cfg))
    else:
        m = Dinov2Model(Dinov2Config(**cfg))
    return randomize_(m, seed).eval()


def hf_clip_vision(seed: int = 0, **overrides):
    """transformers CLIPVisionModelWithProjection (defaults: a ViT-B/16-shaped config of reduced width/depth)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536,
               image_size=224, patch_size=16, projection_dim=256, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)), seed).eval()


def open_clip_visual(model_name: str = "ViT-B-16-quickgelu", seed: int = 0, **vision_overrides):
    """open_clip's vision tower of ``model_name`` (real config unless overridden), random weights."""
    open_clip = import_open_clip()
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = open_clip.get_model_config(model_name)
    vcfg = CLIPVisionCfg(**{**cfg["vision_cfg"], **vision_overrides})
    torch.manual_seed(seed)
    visual = _build_vision_tower(cfg["embed_dim"], vcfg, quick_gelu=cfg.get("quick_gelu", False))
    return randomize_(visual, seed).eval()


def timm_model(name: str, seed: int = 0, **kwargs):
    timm = import_timm()
    torch.manual_seed(seed)
    return randomize_(timm.create_model(name, pretrained=False, num_classes=0, **kwargs), seed).eval()


# ------------------------------------------------------------------ native checkpoint files


def save_torch(sd: dict, path) -> str:
    torch.save({k: v.detach().clone() for k, v in sd.items()}, path)
    return str(path)


def save_hf(model, directory) -> str:
    model.save_pretrained(str(directory))
    return str(directory)


def deit_official_state_dict(timm_sd: dict) -> dict:
    """timm DeiT III names -> the official DeiT III ``.pth`` layout (``{"model": ...}``, ``gamma_1/2``)."""
    import re

    inner = {re.sub(r"^blocks\.(\d+)\.ls([12])\.gamma$", r"blocks.\1.gamma_\2", k): v for k, v in timm_sd.items()}
    return {"model": inner, "epoch": 0}


class _OpenAIClip(torch.nn.Module):
    """The attribute tree of OpenAI's CLIP (``visual`` + a ``logit_scale``), for a TorchScript archive."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.logit_scale = torch.nn.Parameter(torch.ones([]) * 4.6)

    def forward(self, x):
        return self.visual(x) * self.logit_scale.exp()


def save_openai_torchscript(visual, path, size: int = 224) -> str:
    """A traced TorchScript archive with OpenAI CLIP's layout (``visual.conv1.weight``, ...)."""
    traced = torch.jit.trace(_OpenAIClip(visual).eval(), images(1, size), check_trace=False)
    torch.jit.save(traced, str(path))
    return str(path)
