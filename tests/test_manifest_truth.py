"""What the manifest and the docs say about the graph is what the graph does (issue 12): the
position rule named is the one applied, and --rows all changes no output of the exported graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import random_model, tiny_spec

from itae_export.model.itae import inject_itae
from itae_export.registry import ITAEOptions, get_model_spec


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg", "clip_vitb16"])
def test_position_rule_applied_is_none_on_the_native_grid(name):
    spec = tiny_spec(name, pos_grid=4)
    model = random_model(spec)
    p = spec.arch.patch_size
    assert model.pos_rule == spec.pos_rule != "none"
    assert model.applied_pos_rule(4 * p) == "none"  # e.g. DINOv2 at 518, CLIP ViT-B/16 at 224
    assert model.applied_pos_rule(5 * p) == spec.pos_rule
    # at the native grid the stored table is used as it is: bit for bit
    G, D = 4, spec.arch.embed_dim
    grid = model.pos_embed[:, -G * G:]
    assert torch.equal(model.pos_table(G, G)[:, -G * G:], grid)
    assert not torch.equal(model.pos_table(5, 5)[:, -G * G:], grid)


def test_registered_native_resolutions():
    """The resolutions at which the manifest says ``none``: 518 for DINOv2 (37 x 14), 224 for CLIP."""
    for name, res in (("dinov2_vits14", 518), ("dinov2_vitg14", 518), ("clip_vitb16", 224)):
        a = get_model_spec(name).arch
        assert a.pos_grid * a.patch_size == res


@pytest.mark.parametrize("source", ["query", "output"])
def test_rows_all_changes_no_exported_output(source):
    """The graph outputs the CLS path only (embedding, artifact_mask, cls_attention); with rows=all
    it equals rows=cls bit for bit, as docs/onnx-ops.md and the README say."""
    spec = tiny_spec("dinov2_vits14", pos_grid=4)
    model = random_model(spec, seed=3)
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    inject_itae(model, ITAEOptions(theta=0.0, source=source))
    with torch.no_grad():
        theta = float(np.quantile(model.forward_features(x)["norms"].numpy(), 0.3))
    outs = {}
    for rows in ("cls", "all"):
        inject_itae(model, ITAEOptions(theta=theta, rows=rows, source=source))
        with torch.no_grad():
            f = model.forward_features(x, cls_only=True)
        outs[rows] = f
    assert outs["cls"]["artifact_mask"].any()
    for k in ("embedding", "artifact_mask", "cls_attention"):
        assert torch.equal(outs["cls"][k], outs["all"][k]), k
