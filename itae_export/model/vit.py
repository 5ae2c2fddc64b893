"""One vision transformer for DINOv2, CLIP and DeiT III, with the upstream parameter names.

Names follow the official DINOv2 code and timm (``blocks.N.attn.qkv``, ``ls1.gamma``,
``mlp.fc1`` / ``mlp.w12``, ``norm_pre``), so official DINOv2 and timm checkpoints load with
``strict=True`` and no remap; CLIP and Hugging Face checkpoints go through the pure key maps
of :mod:`itae_export.weights.checkpoints`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from itae_export.model.itae import inject_itae
from itae_export.registry import POS_RULES, ArchConfig, ITAEOptions, ModelSpec


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """DINOv2's SwiGLUFFNFused (ViT-g/14): w12 packs the gate and the value."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Attention(nn.Module):
    """Plain multi-head self-attention with a packed qkv projection (q, k, v order)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        q, k, v = self.qkv(x_BTC).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        o_BHTD = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o_BHTD.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1 = LayerScale(dim) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = SwiGLUFFN(dim, cfg.mlp_hidden) if cfg.ffn == "swiglu" else Mlp(dim, cfg.mlp_hidden, cfg.act)
        self.ls2 = LayerScale(dim) if cfg.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor, **attn_kwargs):
        out = self.attn(self.norm1(x), **attn_kwargs)
        aux = None
        if isinstance(out, tuple):  # an injected ITAE attention also returns what it found
            out, aux = out
        if attn_kwargs.get("cls_only"):  # the attention answered for the CLS token only
            x = x[:, :1]
        x = x + self.ls1(out)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x if aux is None else (x, aux)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def interpolate_pos_table(table_1GGD: torch.Tensor, gh: int, gw: int, rule: str) -> torch.Tensor:
    """Resize a square grid of position embeddings [1, G, G, D] to [1, gh*gw, D].

    Rules (all bicubic, computed in float32):
      - ``dinov2-offset``: official DINOv2 without registers, ``scale_factor=((gh+0.1)/G, (gw+0.1)/G)``;
      - ``bicubic``: ``size=(gh, gw)``, as ``transformers.Dinov2Model`` and CLIPVisionModel;
      - ``bicubic-aa``: ``size=(gh, gw)`` with antialias, as official DINOv2 ``*_reg``, timm and open_clip;
      - ``none``: the grid must already match.
    """
    G, D = table_1GGD.shape[1], table_1GGD.shape[-1]
    if (gh, gw) == (G, G):
        return table_1GGD.reshape(1, G * G, D)
    if rule not in POS_RULES or rule == "none":
        raise ValueError(f"position grid {G}x{G} needs resizing to {gh}x{gw}, but the rule is {rule!r}")
    t = table_1GGD.float().permute(0, 3, 1, 2)
    if rule == "dinov2-offset":
        t = F.interpolate(t, scale_factor=((gh + 0.1) / G, (gw + 0.1) / G), mode="bicubic")
    else:
        t = F.interpolate(t, size=(gh, gw), mode="bicubic", align_corners=False, antialias=rule == "bicubic-aa")
    assert t.shape[-2:] == (gh, gw), t.shape
    return t.permute(0, 2, 3, 1).reshape(1, gh * gw, D).to(table_1GGD.dtype)


class VisionTransformer(nn.Module):
    """The one ViT. ``forward`` returns the image embedding; ``forward_features`` returns everything."""

    def __init__(self, cfg: ArchConfig, pos_rule: str = "none"):
        super().__init__()
        self.cfg = cfg
        self.pos_rule = pos_rule
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        n_pos = cfg.pos_grid**2 + (1 if cfg.pos_embed_cls else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, D))
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, D))
        if cfg.mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, D))  # unused at inference; in the checkpoints
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, cfg.proj_dim, bias=False) if cfg.proj_dim else nn.Identity()
        self._fixed_grid: tuple[int, int] | None = None
        self.register_buffer("pos_embed_fixed", None, persistent=False)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.cfg.num_register_tokens

    def pos_table(self, gh: int, gw: int) -> torch.Tensor:
        """Position embeddings for a gh x gw patch grid, CLS row first when the table has one."""
        if self._fixed_grid == (gh, gw) and self.pos_embed_fixed is not None:
            return self.pos_embed_fixed
        G, D = self.cfg.pos_grid, self.cfg.embed_dim
        cls_rows = self.pos_embed[:, :1] if self.cfg.pos_embed_cls else self.pos_embed[:, :0]
        grid = self.pos_embed[:, cls_rows.shape[1]:].reshape(1, G, G, D)
        return torch.cat([cls_rows, interpolate_pos_table(grid, gh, gw, self.pos_rule)], dim=1)

    @torch.no_grad()
    def fix_resolution(self, height: int, width: int | None = None) -> "VisionTransformer":
        """Compute the position table for one input size once and store it (used by export)."""
        width = width or height
        p = self.cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"resolution {height}x{width} is not a multiple of the patch size {p}")
        self._fixed_grid = None
        table = self.pos_table(height // p, width // p).detach().clone()
        self.pos_embed_fixed = table
        self._fixed_grid = (height // p, width // p)
        return self

    def applied_pos_rule(self, height: int, width: int | None = None) -> str:
        """The position rule a ``height x width`` input really goes through: ``none`` on the
        checkpoint's own grid (the table is used as stored), else the model's ``pos_rule``."""
        width = width or height
        p, G = self.cfg.patch_size, self.cfg.pos_grid
        return "none" if (height // p, width // p) == (G, G) else self.pos_rule

    def prepare_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        p = self.cfg.patch_size
        x = self.patch_embed(pixel_values)
        pos = self.pos_table(H // p, W // p).to(x.dtype)
        cls = self.cls_token.expand(B, -1, -1).to(x.dtype)
        if self.cfg.pos_embed_cls:
            x = torch.cat([cls, x], dim=1) + pos
        else:  # DeiT III: the class token carries no position
            x = torch.cat([cls, x + pos], dim=1)
        if self.cfg.num_register_tokens:
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        return self.norm_pre(x)

    def forward_features(self, pixel_values: torch.Tensor, cls_only: bool = False,
                         artifact_mask: torch.Tensor | None = None, unpatched: bool = False) -> dict:
        """Every output; ``cls_only`` (needs ITAE injected) runs the last block's attention row,
        projection and MLP for the CLS token only, and returns the CLS entries and ITAE's.
        ``artifact_mask`` [B, T-1] (bool, needs ITAE injected): use this mask instead of the
        one ITAE would compute (validation replays a graph's mask through the float64 model)."""
        x = self.prepare_tokens(pixel_values)
        cls_kw = {"cls_only": True} if cls_only else {}
        if unpatched:  # the CLS embedding without the ITAE edit too (cls_only, ITAE injected)
            cls_kw["unpatched"] = True
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        aux = {}
        attn = last.attn
        x_in = x
        if artifact_mask is not None:
            x, aux = last(x, artifact_mask=(artifact_mask, None), **cls_kw)
        elif getattr(attn, "needs_unpatched_output", False):
            # source=output: the norms of the unpatched last block's output tokens
            x_plain, _ = last(x, bypass=True)
            x, aux = last(x, artifact_mask=attn.mask_from_output(x_plain), **cls_kw)
        else:
            out = last(x, **cls_kw)
            x, aux = out if isinstance(out, tuple) else (out, {})
        if "cls_out_unpatched" in aux:  # the rest of the last block for the unedited CLS row
            aux = dict(aux)
            x_u = x_in[:, :1] + last.ls1(aux.pop("cls_out_unpatched"))
            x_u = x_u + last.ls2(last.mlp(last.norm2(x_u)))
            aux["embedding_unpatched"] = self.head(self.norm(x_u)[:, 0])
        x_norm = self.norm(x)
        if cls_only:
            return {"x_norm_clstoken": x_norm[:, 0], "embedding": self.head(x_norm[:, 0]), **aux}
        R = self.cfg.num_register_tokens
        return {
            "x_prenorm": x,
            "x_norm": x_norm,
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : 1 + R],
            "x_norm_patchtokens": x_norm[:, 1 + R :],
            "embedding": self.head(x_norm[:, 0]),
            **aux,
        }

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cls_only = hasattr(self.blocks[-1].attn, "options")  # the ITAE attention can skip the patch rows
        return self.forward_features(pixel_values, cls_only=cls_only)["embedding"]


def init_random_(model: VisionTransformer, seed: int = 0, layerscale: float = 1.0) -> VisionTransformer:
    """Random weights of a plausible scale (tests and benchmarks; never a substitute for real weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(layerscale)
            elif p.ndim == 1 and ("norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                std = 0.02 if name in ("cls_token", "pos_embed", "register_tokens", "mask_token") else 1 / math.sqrt(fan_in)
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def build_model(spec: ModelSpec, itae: ITAEOptions | None = None, pos_rule: str | None = None) -> VisionTransformer:
    """An uninitialised model of the spec's architecture, with ITAE injected into the last block."""

    model = VisionTransformer(spec.arch, pos_rule=pos_rule or spec.pos_rule)
    if itae is not None:
        inject_itae(model, itae)
    return model.eval()
