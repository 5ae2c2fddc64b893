"""CLIP's text tower, with OpenAI's parameter names (which open_clip keeps), so that OpenAI and
open_clip checkpoints load without a remap; Hugging Face ``CLIPModel`` keys are renamed by
:func:`convert_text_state_dict`.

    token_embedding.weight [V, W]       positional_embedding [77, W]
    transformer.resblocks.{i}.ln_1 / attn.in_proj_weight [3W, W] / attn.in_proj_bias / attn.out_proj
                         .ln_2 / mlp.c_fc / mlp.c_proj
    ln_final             text_projection [W, E]  (features @ text_projection)

forward(input_ids [n, 77] int64) -> [n, E]: token + position embeddings, causal pre-norm blocks,
ln_final, the features at the end-of-text token (the first position holding the largest id:
EOT = 49407 is the largest id of the vocabulary), times text_projection.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from itae_export.errors import CheckpointError
from itae_export.registry import TextArchConfig


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """nn.MultiheadAttention's parameter names (in_proj_weight/bias, out_proj), the math written out."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x_BTW: torch.Tensor, mask_TT: torch.Tensor) -> torch.Tensor:
        B, T, W = x_BTW.shape
        h, dh = self.heads, W // self.heads
        qkv = F.linear(x_BTW, self.in_proj_weight, self.in_proj_bias)
        q_BHTd, k_BHTd, v_BHTd = qkv.reshape(B, T, 3, h, dh).permute(2, 0, 3, 1, 4)
        logits_BHTT = (q_BHTd * dh ** -0.5) @ k_BHTd.transpose(-1, -2) + mask_TT
        out = logits_BHTT.softmax(dim=-1) @ v_BHTd
        return self.out_proj(out.transpose(1, 2).reshape(B, T, W))


class Mlp(nn.Module):
    def __init__(self, width: int, act: str):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, act: str, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, act)

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, a: TextArchConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(a.width, a.heads, a.act, a.norm_eps) for _ in range(a.layers))


class TextTransformer(nn.Module):
    def __init__(self, arch: TextArchConfig):
        super().__init__()
        self.arch = arch
        self.token_embedding = nn.Embedding(arch.vocab_size, arch.width)
        self.positional_embedding = nn.Parameter(torch.empty(arch.context_length, arch.width))
        self.transformer = Transformer(arch)
        self.ln_final = nn.LayerNorm(arch.width, eps=arch.norm_eps)
        self.text_projection = nn.Parameter(torch.empty(arch.width, arch.embed_dim))
        T = arch.context_length
        self.register_buffer("attn_mask", torch.full((T, T), float("-inf")).triu(1), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(input_ids) + self.positional_embedding
        for block in self.transformer.resblocks:
            x = block(x, self.attn_mask)
        x = self.ln_final(x)
        eot = input_ids.argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        return pooled @ self.text_projection


@torch.no_grad()
def init_random_(model: TextTransformer, seed: int = 0) -> TextTransformer:
    """Random weights for tests and benches: every parameter, norms and biases included."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight")):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


# ------------------------------------------------------------------ checkpoints

_OPENAI_TOP = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_HF_BLOCK = [
    (r"layer_norm1\.(weight|bias)", r"ln_1.\1"),
    (r"layer_norm2\.(weight|bias)", r"ln_2.\1"),
    (r"mlp\.fc1\.(weight|bias)", r"mlp.c_fc.\1"),
    (r"mlp\.fc2\.(weight|bias)", r"mlp.c_proj.\1"),
    (r"self_attn\.out_proj\.(weight|bias)", r"attn.out_proj.\1"),
]


def _prefix_of(keys, anchor: str) -> str | None:
    hits = [k[: -len(anchor)] for k in keys if k.endswith(anchor) and (len(k) == len(anchor) or k[-len(anchor) - 1] == ".")]
    return min(hits, key=len) if hits else None


def convert_text_state_dict(raw: dict, source: str = "checkpoint") -> tuple[dict, str]:
    """(state dict with our names, format) from a whole CLIP checkpoint (OpenAI, open_clip or
    Hugging Face ``CLIPModel``); the vision tower's keys are left out."""
    keys = list(raw)
    pre = _prefix_of(keys, "text_model.embeddings.token_embedding.weight")
    if pre is not None:
        return _convert_hf(raw, pre, source), "hf-clip"
    pre = _prefix_of(keys, "token_embedding.weight")
    if pre is not None:
        out = {}
        for k, v in raw.items():
            if k.startswith(pre) and k[len(pre):].startswith(_OPENAI_TOP) and not k.endswith("attn_mask"):
                out[k[len(pre):]] = v
        return out, "openai-clip/open-clip"
    raise CheckpointError(f"{source}: no CLIP text tower in this checkpoint (no token_embedding.weight)")


def _convert_hf(raw: dict, pre: str, source: str) -> dict:
    t = pre + "text_model."
    out = {
        "token_embedding.weight": raw[t + "embeddings.token_embedding.weight"],
        "positional_embedding": raw[t + "embeddings.position_embedding.weight"],
        "ln_final.weight": raw[t + "final_layer_norm.weight"],
        "ln_final.bias": raw[t + "final_layer_norm.bias"],
    }
    proj = pre + "text_projection.weight"
    if proj not in raw:
        raise CheckpointError(f"{source}: no text_projection.weight (a CLIPTextModel without projection?)")
    out["text_projection"] = raw[proj].t().contiguous()
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in raw.items():
        m = re.fullmatch(re.escape(t) + r"encoder\.layers\.(\d+)\.(.+)", k)
        if not m:
            continue
        layer, rest = int(m.group(1)), m.group(2)
        mq = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if mq:
            qkv.setdefault((layer, mq.group(2)), {})[mq.group(1)] = v
            continue
        for pat, rep in _HF_BLOCK:
            if re.fullmatch(pat, rest):
                out[f"transformer.resblocks.{layer}." + re.sub(pat, rep, rest)] = v
                break
        else:
            raise CheckpointError(f"{source}: unexpected text key {k}")
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def build_text_model(arch: TextArchConfig, state_dict: dict | None = None, source: str = "checkpoint") -> TextTransformer:
    """The text tower of ``arch``; with ``state_dict``, loaded strictly (every key, every shape)."""
    model = TextTransformer(arch)
    if state_dict is not None:
        own = model.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state_dict and state_dict[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise CheckpointError(f"{source}: the text tower does not fit {arch}: missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]}, shapes {shapes[:3]}")
        model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()
