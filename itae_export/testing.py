"""Tiny architectures of each family, for tests and examples (width 64, depth 2)."""

from __future__ import annotations

import dataclasses

from itae_export.registry import ModelSpec, get_model_spec


def tiny_spec(name: str = "dinov2_vits14", *, embed_dim: int = 64, depth: int = 2, num_heads: int = 4,
              pos_grid: int | None = None) -> ModelSpec:
    """The registry entry of ``name`` with a tiny width and depth; everything else unchanged."""
    spec = get_model_spec(name)
    a = spec.arch
    hidden = ((int(embed_dim * 4 * 2 / 3) + 7) // 8 * 8) if a.ffn == "swiglu" else embed_dim * 4
    arch = dataclasses.replace(
        a,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_hidden=hidden,
        pos_grid=pos_grid or a.pos_grid,
        proj_dim=32 if a.proj_dim else None,
    )
    return dataclasses.replace(spec, name=f"tiny_{spec.name}", arch=arch, aliases=())
