"""Test helpers: tiny architectures of each family (width 64, depth 2), random models, and a plain
attention put back into the last block."""

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


def random_model(spec: ModelSpec, seed: int = 0, layerscale: float = 1.0):
    """A model of ``spec``'s architecture with random weights (no ITAE injected yet)."""
    from itae_export.model.vit import build_model, init_random_

    return init_random_(build_model(spec, None), seed=seed, layerscale=layerscale)


def theta_for_varied_artifacts(model, spec: ModelSpec, quantile: float = 0.8, source: str = "query") -> float:
    """A theta inside the projection-norm distribution of the validation inputs.

    Random weights show no bimodality, so the default thetas would flag nothing; a quantile of
    the actual norms makes the artifact set non-empty and different from image to image.
    """
    import copy

    import numpy as np
    import torch

    from itae_export.model.itae import inject_itae
    from itae_export.onnx.validate import validation_inputs
    from itae_export.registry import ITAEOptions

    probe = inject_itae(copy.deepcopy(model), ITAEOptions(theta=0.0, source=source))
    probe.fix_resolution(spec.preprocessing.resolution)
    x, _ = validation_inputs({"preprocessing": spec.preprocessing.to_dict()})
    with torch.no_grad():
        norms = probe.forward_features(torch.from_numpy(x))["norms"].numpy()
    return float(np.quantile(norms, quantile))


def remove_itae(model):
    """Put a plain attention back into the last block (same weights)."""
    from itae_export.model.itae import ITAEAttention
    from itae_export.model.vit import Attention

    last = model.blocks[-1]
    if isinstance(last.attn, ITAEAttention):
        plain = Attention(last.attn.qkv.in_features, last.attn.num_heads)
        plain.qkv, plain.proj = last.attn.qkv, last.attn.proj  # the same modules, not copies
        last.attn = plain
    return model
