"""Property tests of ITAE (issue 2), against /work/shared/ITAE_SPEC.md.

Three layers:
- the two custom ops on hand-made tensors, with expected values written out by hand and a
  plain-Python loop reference of the spec (no torch vectorisation in the reference);
- the injected model (tiny specs, random weights): no-artifact thetas reproduce the unpatched
  model, rows=cls leaves patch outputs alone, cls_attention is a distribution;
- the artifact mask of the model against an independent numpy computation of Eq. 2-4 from the
  last block's qkv weights (sources query/key/value) or the unpatched output (source=output).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hand_cases import HAND_CLS_ROWS, HAND_EXPECTED, HAND_MASK, HAND_NORMS, hand_logits as _hand_logits
from tiny import remove_itae, tiny_spec

import itae_export.model.ops  # noqa: F401  (registers torch.ops.itae.*)
from itae_export.model import ops
from itae_export.model.itae import ITAEAttention, inject_itae
from itae_export.model.vit import build_model, init_random_
from itae_export.registry import GROUPS, STRATEGIES, ITAEOptions

INF = float("inf")
GRID = 4  # patch grid side of the tiny test models (no position interpolation)
FAMILIES = ["dinov2_vits14", "dinov2_vits14_reg", "clip_vitb16", "deit3_base16"]


# ----------------------------------------------------------------------------- helpers


def _mask(x, theta, scale=1.0, group="minority"):
    return torch.ops.itae.artifact_mask(x, float(theta), float(scale), GROUPS.index(group))


def _attenuate(s, mask, strategy="min", all_rows=False, lsa=False):
    return torch.ops.itae.attenuate_logits(s, mask, STRATEGIES.index(strategy), all_rows, lsa)


def _x_with_norms(norms_BT, width=1):
    """Tokens [B, T, width] whose (plain) L2 norms are exactly the given numbers."""
    x = torch.zeros(len(norms_BT), len(norms_BT[0]), width)
    x[..., 0] = torch.tensor(norms_BT, dtype=torch.float32)
    return x


def _ref_group(norms, theta, group):
    """Eq. 2-3 for one image, in plain Python. ``norms`` are the candidates (CLS excluded)."""
    la = [t for t, n in enumerate(norms) if n <= theta]
    lb = [t for t, n in enumerate(norms) if n > theta]
    if group == "below":
        a = la
    elif group == "above":
        a = lb
    elif not la or not lb:
        a = []
    else:
        a = la if len(la) <= len(lb) else lb
    return [t in a for t in range(len(norms))]


def _ref_attenuate(s, mask, strategy, all_rows, lsa):
    """Eq. 5-6 (+ LSA) in plain Python loops over a float64 copy of ``s`` [B, H, Q, T]."""
    s = np.asarray(s, dtype=np.float64)
    out = s.copy()
    B, H, Q, T = s.shape
    for b in range(B):
        for h in range(H):
            for i in range(Q):
                if i != 0 and not all_rows:
                    continue
                row = [float(v) for v in s[b, h, i]]
                if lsa:
                    row[i] = -INF
                cand = row[1:]
                if strategy == "min":
                    sub = min(cand)
                elif strategy == "mean":
                    sub = sum(cand) / len(cand)
                else:
                    sub = -INF
                for k in range(1, T):
                    if mask[b][k - 1]:
                        row[k] = sub
                out[b, h, i] = row
    return out


def _tiny(name, options, seed=0):
    spec = tiny_spec(name, pos_grid=GRID)
    model = init_random_(build_model(spec, options), seed=seed)
    return model, spec


def _images(spec, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    side = GRID * spec.arch.patch_size
    return torch.randn(batch, 3, side, side, generator=g)


@torch.no_grad()
def _features(model, x):
    return model.forward_features(x)


def _unpatched(model):
    return remove_itae(copy.deepcopy(model))


def _set_options(model, options):
    inject_itae(model, options)
    assert isinstance(model.blocks[-1].attn, ITAEAttention)
    return model


def _gap_theta(norms, lo=0.2, hi=0.45):
    """A theta in the widest gap between sorted norms with rank in [lo, hi] of all of them.

    Sitting in a wide gap, the mask cannot flip on float rounding between implementations.
    """
    s = np.sort(np.asarray(norms, dtype=np.float64).ravel())
    n = len(s)
    ks = range(max(1, int(lo * n)), int(hi * n) + 1)
    k = max(ks, key=lambda k: s[k] - s[k - 1])
    gap = s[k] - s[k - 1]
    assert gap > 1e-4 * s[k], f"test setup: no clear gap in the norms ({gap})"
    return float((s[k] + s[k - 1]) / 2)


def _capture_attn_input(model):
    """Hook that stores the input of the last block's attention (norm1 output)."""
    seen = {}

    def hook(module, args):
        seen["x"] = args[0].detach().clone()

    handle = model.blocks[-1].attn.register_forward_pre_hook(hook)
    return seen, handle


def _ref_qkv_norms(x_BTC, qkv_linear, num_heads, source):
    """Eq. 4 from scratch: project with the qkv weights in float64, loop over b, t, h, j."""
    x = x_BTC.double().numpy()
    W = qkv_linear.weight.detach().double().numpy()
    bias = qkv_linear.bias.detach().double().numpy()
    B, T, C = x.shape
    d = C // num_heads
    part = {"query": 0, "key": 1, "value": 2}[source]
    Wp, bp = W[part * C : (part + 1) * C], bias[part * C : (part + 1) * C]
    norms = np.zeros((B, T - 1))
    for b in range(B):
        for t in range(1, T):
            p = Wp @ x[b, t] + bp  # [C], heads are contiguous chunks of d
            total = 0.0
            for h in range(num_heads):
                for j in range(d):
                    total += (p[h * d + j] / math.sqrt(d)) ** 2
            norms[b, t - 1] = math.sqrt(total)
    return norms


def _ref_plain_norms(x_BTC):
    x = x_BTC.double().numpy()
    B, T, C = x.shape
    norms = np.zeros((B, T - 1))
    for b in range(B):
        for t in range(1, T):
            norms[b, t - 1] = math.sqrt(sum(float(v) ** 2 for v in x[b, t]))
    return norms


# ----------------------------------------------------------------------------- codes


def test_option_codes_match_op_codes():
    assert [ITAEOptions(group=g).group_code for g in ("minority", "below", "above")] == [
        ops.GROUP_MINORITY, ops.GROUP_BELOW, ops.GROUP_ABOVE]
    assert [ITAEOptions(strategy=s).strategy_code for s in ("min", "neg-inf", "mean")] == [
        ops.STRATEGY_MIN, ops.STRATEGY_NEG_INF, ops.STRATEGY_MEAN]


# ----------------------------------------------------------------------------- artifact_mask by hand

@pytest.mark.parametrize("group", GROUPS)
def test_artifact_mask_hand_examples(group):
    x = _x_with_norms(HAND_NORMS, width=3)
    mask, norms = _mask(x, 3.0, 1.0, group)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (6, 4)
    assert norms.dtype == torch.float32
    assert torch.equal(norms, torch.tensor([row[1:] for row in HAND_NORMS])), "norms exclude the CLS token"
    assert mask.tolist() == HAND_EXPECTED[group], f"group={group}: {mask.tolist()}"
    # the hand table agrees with the plain-Python reference of the spec
    assert [_ref_group(row[1:], 3.0, group) for row in HAND_NORMS] == HAND_EXPECTED[group]


def test_artifact_mask_norm_is_over_all_heads_with_scale():
    # one token [3, 4, 0, 12] -> ||.|| = 13; scale 1/sqrt(d) with d = 4 -> 6.5
    x = torch.tensor([[[100.0, 0, 0, 0], [3.0, 4.0, 0.0, 12.0], [0.0, 0.0, 0.0, 1.0]]])
    _, norms = _mask(x, 1.0, 0.5)
    assert norms.tolist() == [[6.5, 0.5]]
    # theta strictly between -> the small one is La; tie 1 vs 1 -> La
    mask, _ = _mask(x, 6.0, 0.5)
    assert mask.tolist() == [[False, True]]
    mask, _ = _mask(x, 6.5, 0.5)  # both <= theta: Lb empty
    assert mask.tolist() == [[False, False]]


def test_artifact_mask_is_per_image():
    x = _x_with_norms(HAND_NORMS, width=2)
    full, full_norms = _mask(x, 3.0)
    for b in range(x.shape[0]):
        one, one_norms = _mask(x[b : b + 1], 3.0)
        assert torch.equal(full[b : b + 1], one), f"image {b} depends on the rest of the batch"
        assert torch.equal(full_norms[b : b + 1], one_norms)
    # reversing the batch reverses the masks
    rev, _ = _mask(x.flip(0), 3.0)
    assert torch.equal(rev, full.flip(0))


def test_artifact_mask_float16_norms_in_float32():
    # Squares of 300 overflow float16 (max 65504): a float16 norm would be inf.
    x32 = torch.zeros(2, 5, 8)
    x32[0, 1:, 0] = torch.tensor([300.0, 310.0, 1.0, 2.0])
    x32[1, 1:, :] = 250.0  # ||.|| = 250 * sqrt(8) = 707.1...
    x32[1, 2, :] = 0.5
    x16 = x32.half()
    mask16, norms16 = _mask(x16, 305.0 / 2, 0.5)
    assert norms16.dtype == torch.float32, "norms must be float32 for a float16 input"
    assert torch.isfinite(norms16).all(), f"norms overflowed: {norms16}"
    mask_up, norms_up = _mask(x16.float(), 305.0 / 2, 0.5)
    assert torch.equal(mask16, mask_up)
    assert torch.equal(norms16, norms_up)
    ref = _ref_plain_norms(x16.float()) * 0.5
    np.testing.assert_allclose(norms16.numpy(), ref, rtol=1e-6)
    # scaled norms 150, 155, 0.5, 1 and theta 152.5: La = {1, 3, 4}, Lb = {2}: the 310 token
    assert mask16[0].tolist() == [False, True, False, False]


# ----------------------------------------------------------------------------- attenuate_logits by hand

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_attenuate_hand_cls_rows(strategy):
    s = _hand_logits()
    out = _attenuate(s, HAND_MASK, strategy)
    for (b, h), row in HAND_CLS_ROWS[strategy].items():
        assert out[b, h, 0].tolist() == row, f"{strategy} b={b} h={h}: {out[b, h, 0].tolist()}"
    # rows=cls: every other row untouched, bit for bit
    assert torch.equal(out[:, :, 1:], s[:, :, 1:])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_attenuate_hand_all_rows(strategy):
    s = _hand_logits()
    out = _attenuate(s, HAND_MASK, strategy, all_rows=True)
    # image 0, head 0, row 2: [2, 6, 0, -1, 8], artifacts {2, 4}; candidates 6, 0, -1, 8
    expected = {"min": [2, 6, -1, -1, -1], "mean": [2, 6, 3.25, -1, 3.25], "neg-inf": [2, 6, -INF, -1, -INF]}
    assert out[0, 0, 2].tolist() == expected[strategy]
    # image 1, head 1, row 3: [1, 1, 4, 9, -6], artifact {1}; candidates 1, 4, 9, -6
    expected = {"min": [1, -6, 4, 9, -6], "mean": [1, 2, 4, 9, -6], "neg-inf": [1, -INF, 4, 9, -6]}
    assert out[1, 1, 3].tolist() == expected[strategy]
    # the CLS row gets the same edit as with rows=cls
    assert torch.equal(out[:, :, 0], _attenuate(s, HAND_MASK, strategy)[:, :, 0])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_attenuate_hand_lsa(strategy):
    s = _hand_logits()
    out = _attenuate(s, HAND_MASK, strategy, lsa=True)
    # CLS row: LSA masks column 0, which is not a candidate, so the substitute is unchanged
    expected = {"min": [-INF, 1, -3, 3, -3], "mean": [-INF, 1, 1.25, 3, 1.25], "neg-inf": [-INF, 1, -INF, 3, -INF]}
    assert out[0, 0, 0].tolist() == expected[strategy]
    # an image without artifact in the masked column still gets the diagonal masked
    assert out[1, 0, 0].tolist()[0] == -INF
    assert torch.equal(out[:, :, 1:], s[:, :, 1:]), "rows=cls + LSA touched a patch row"
    # rows=all: row 3 of image 1, head 1 gets S[3,3] = -inf before the substitution; the
    # diagonal is a candidate column, so min and mean over C become -inf (literal spec order)
    out = _attenuate(s, HAND_MASK, strategy, all_rows=True, lsa=True)
    expected = {"min": [1, -INF, 4, -INF, -6], "mean": [1, -INF, 4, -INF, -6], "neg-inf": [1, -INF, 4, -INF, -6]}
    assert out[1, 1, 3].tolist() == expected[strategy]


@pytest.mark.parametrize("lsa", [False, True], ids=["nolsa", "lsa"])
@pytest.mark.parametrize("all_rows", [False, True], ids=["cls", "all"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_attenuate_matches_loop_reference(strategy, all_rows, lsa):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 2, 6, 6, generator=g) * 3
    mask = torch.tensor([[True, False, False, True, False], [False] * 5, [False, True, True, False, True]])
    out = _attenuate(s, mask, strategy, all_rows, lsa)
    ref = _ref_attenuate(s.numpy(), mask.tolist(), strategy, all_rows, lsa)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-6, atol=1e-6)
    if strategy != "mean":  # min and -inf are copies: exact
        assert np.array_equal(out.double().numpy(), ref)


def test_attenuate_neg_inf_gives_exact_zero_weight():
    s = _hand_logits()
    a = _attenuate(s, HAND_MASK, "neg-inf").softmax(-1)
    cols = torch.cat([torch.zeros(2, 1, dtype=torch.bool), HAND_MASK], 1)  # [B, T]
    cls_rows = a[:, :, 0]  # [B, H, T]
    assert (cls_rows[cols[:, None, :].expand_as(cls_rows)] == 0).all()
    assert (cls_rows[~cols[:, None, :].expand_as(cls_rows)] > 0).all()
    torch.testing.assert_close(cls_rows.sum(-1), torch.ones(2, 2))


def test_attenuate_is_per_image():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 2, 6, 6, generator=g)
    mask = torch.tensor([[True, False, False, True, False], [False] * 5, [False, True, True, False, True]])
    for strategy in STRATEGIES:
        full = _attenuate(s, mask, strategy, True, False)
        for b in range(3):
            one = _attenuate(s[b : b + 1], mask[b : b + 1], strategy, True, False)
            assert torch.equal(full[b : b + 1], one), f"{strategy}: image {b} depends on the batch"
    # the image without artifacts is untouched, whatever the others have
    assert torch.equal(_attenuate(s, mask, "min", True, False)[1], s[1])


# ----------------------------------------------------------------------------- the model


NO_ARTIFACT_CASES = [
    pytest.param(family, 0.0, "minority", id=f"{family}-theta0-minority") for family in FAMILIES  # La empty
] + [
    pytest.param(family, 1e6, "minority", id=f"{family}-huge-minority") for family in FAMILIES  # Lb empty
] + [
    pytest.param("dinov2_vits14_reg", 0.0, "below", id="reg-theta0-below"),  # A = La = empty
    pytest.param("dinov2_vits14_reg", 1e6, "above", id="reg-huge-above"),  # A = Lb = empty
]


@pytest.mark.parametrize("family,theta,group", NO_ARTIFACT_CASES)
def test_no_artifacts_reproduces_unpatched(family, theta, group):
    # rows=all edits the most, so it would show any stray edit; lsa=False (LSA edits regardless)
    model, spec = _tiny(family, ITAEOptions(theta=theta, group=group, rows="all", strategy="min"))
    x = _images(spec)
    f = _features(model, x)
    assert not f["artifact_mask"].any()
    plain = _features(_unpatched(model), x)
    off = _features(_set_options(copy.deepcopy(model), ITAEOptions(enabled=False)), x)
    for ref in (plain, off):
        torch.testing.assert_close(f["embedding"], ref["embedding"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f["x_prenorm"], ref["x_prenorm"], rtol=1e-5, atol=1e-5)


ROWS_CASES = [pytest.param(family, "min", id=f"{family}-min") for family in FAMILIES] + [
    pytest.param("dinov2_vits14_reg", strategy, id=f"reg-{strategy}") for strategy in ("neg-inf", "mean")
]


@pytest.mark.parametrize("family,strategy", ROWS_CASES)
def test_rows_cls_keeps_patch_outputs_rows_all_changes_them(family, strategy):
    model, spec = _tiny(family, ITAEOptions(theta=1.0))
    x = _images(spec)
    norms = _features(model, x)["norms"]
    theta = _gap_theta(norms)
    plain = _features(_unpatched(model), x)

    _set_options(model, ITAEOptions(theta=theta, strategy=strategy, rows="cls"))
    cls = _features(model, x)
    assert cls["artifact_mask"].any(dim=1).all(), "test setup: every image should have artifacts"
    # every non-CLS output (registers and patches) equals the unpatched model's
    torch.testing.assert_close(cls["x_prenorm"][:, 1:], plain["x_prenorm"][:, 1:])
    torch.testing.assert_close(cls["x_norm_patchtokens"], plain["x_norm_patchtokens"])
    # the CLS output and the embedding change in every image (all have artifacts)
    diff_cls = (cls["x_prenorm"][:, 0] - plain["x_prenorm"][:, 0]).abs().amax(-1)
    assert (diff_cls > 1e-4).all(), diff_cls
    diff_emb = (cls["embedding"] - plain["embedding"]).abs().amax(-1)
    assert (diff_emb > 1e-4).all(), diff_emb

    _set_options(model, ITAEOptions(theta=theta, strategy=strategy, rows="all"))
    every = _features(model, x)
    assert torch.equal(every["artifact_mask"], cls["artifact_mask"])
    torch.testing.assert_close(every["x_prenorm"][:, 0], cls["x_prenorm"][:, 0])  # same CLS edit
    diff_patch = (every["x_prenorm"][:, 1:] - plain["x_prenorm"][:, 1:]).abs().amax((1, 2))
    assert (diff_patch > 1e-4).all(), diff_patch


@pytest.mark.parametrize("source", ["query", "key", "value"])
@pytest.mark.parametrize("family", ["dinov2_vits14", "dinov2_vits14_reg", "clip_vitb16"])
def test_model_mask_matches_independent_qkv_norms(family, source):
    model, spec = _tiny(family, ITAEOptions(theta=1.0, source=source), seed=2)
    x = _images(spec, batch=4, seed=5)
    seen, handle = _capture_attn_input(model)
    try:
        _features(model, x)
    finally:
        handle.remove()
    attn = model.blocks[-1].attn
    ref_norms = _ref_qkv_norms(seen["x"], attn.qkv, attn.num_heads, source)
    R = spec.arch.num_register_tokens
    assert ref_norms.shape == (4, R + GRID * GRID), "candidates are registers + patches"

    theta = _gap_theta(ref_norms)
    for group in GROUPS:
        _set_options(model, ITAEOptions(theta=theta, source=source, group=group))
        f = _features(model, x)
        np.testing.assert_allclose(f["norms"].double().numpy(), ref_norms, rtol=1e-5)
        ref_mask = np.array([_ref_group(list(ref_norms[b]), theta, group) for b in range(4)])
        assert ref_mask.any(), "test setup: no artifacts at all"
        assert len({tuple(r) for r in ref_mask}) > 1, "test setup: artifacts identical in every image"
        assert f["artifact_mask"].numpy().tolist() == ref_mask.tolist(), f"source={source} group={group}"


@pytest.mark.parametrize("family", ["dinov2_vits14", "dinov2_vits14_reg", "clip_vitb16"])
def test_model_mask_source_output(family):
    model, spec = _tiny(family, ITAEOptions(theta=1.0, source="output"), seed=2)
    x = _images(spec, batch=4, seed=5)
    plain = _features(_unpatched(model), x)
    # the project's documented choice: plain L2 norms (no 1/sqrt(d)) of the unpatched last
    # block's output tokens (pre final norm), CLS excluded
    ref_norms = _ref_plain_norms(plain["x_prenorm"])
    theta = _gap_theta(ref_norms)
    for group in GROUPS:
        _set_options(model, ITAEOptions(theta=theta, source="output", group=group))
        f = _features(model, x)
        np.testing.assert_allclose(f["norms"].double().numpy(), ref_norms, rtol=1e-5)
        ref_mask = np.array([_ref_group(list(ref_norms[b]), theta, group) for b in range(4)])
        assert ref_mask.any() and len({tuple(r) for r in ref_mask}) > 1, "test setup"
        assert f["artifact_mask"].numpy().tolist() == ref_mask.tolist(), f"group={group}"
        # the patched pass uses that mask: rows=cls -> patch outputs still the unpatched ones
        torch.testing.assert_close(f["x_prenorm"][:, 1:], plain["x_prenorm"][:, 1:])
        if group == "minority":
            assert not torch.allclose(f["embedding"], plain["embedding"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["dinov2_vits14", "clip_vitb16"])
def test_model_float16_norms_are_float32(family):
    model, spec = _tiny(family, ITAEOptions(theta=1.0))
    x = _images(spec)
    theta = _gap_theta(_features(model, x)["norms"])
    model = _set_options(model, ITAEOptions(theta=theta)).half()
    seen = {}
    handle = model.blocks[-1].attn.qkv.register_forward_hook(lambda m, a, out: seen.__setitem__("qkv", out.detach()))
    try:
        f = _features(model, x.half())
    finally:
        handle.remove()
    assert seen["qkv"].dtype == torch.float16
    assert f["embedding"].dtype == torch.float16
    assert f["norms"].dtype == torch.float32
    C = spec.arch.embed_dim
    q32 = seen["qkv"][..., :C].float()  # the float16 query, upcast
    mask32, norms32 = _mask(q32, theta, (C // spec.arch.num_heads) ** -0.5)
    assert torch.equal(f["artifact_mask"], mask32)
    torch.testing.assert_close(f["norms"], norms32, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", ["dinov2_vits14_reg", "clip_vitb16"])
def test_cls_attention_is_a_distribution(family, strategy):
    model, spec = _tiny(family, ITAEOptions(theta=1.0))
    x = _images(spec)
    theta = _gap_theta(_features(model, x)["norms"])
    _set_options(model, ITAEOptions(theta=theta, strategy=strategy))
    f = _features(model, x)
    a = f["cls_attention"]  # [B, H, T]
    B, H, T = a.shape
    assert T == 1 + spec.arch.num_register_tokens + GRID * GRID and H == spec.arch.num_heads
    torch.testing.assert_close(a.sum(-1), torch.ones(B, H))
    assert (a >= 0).all()
    mask = f["artifact_mask"]
    assert mask.any(1).all(), "test setup"
    cols = torch.cat([torch.zeros(B, 1, dtype=torch.bool), mask], 1)[:, None, :].expand(B, H, T)
    if strategy == "neg-inf":
        assert (a[cols] == 0).all(), "artifact columns must get exactly zero weight"
        assert (a[~cols] > 0).all()
    elif strategy == "min":
        # every artifact column has the weight of the smallest candidate weight
        for b in range(B):
            art = cols[b, 0].nonzero().squeeze(1)
            cand_min = a[b, :, 1:].amin(-1, keepdim=True)
            torch.testing.assert_close(a[b][:, art], cand_min.expand(H, len(art)), rtol=1e-6, atol=0)
    else:  # mean: artifact columns all share the weight of the mean logit
        for b in range(B):
            art = cols[b, 0].nonzero().squeeze(1)
            w = a[b][:, art]
            torch.testing.assert_close(w, w[:, :1].expand_as(w), rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", ["dinov2_vits14_reg", "clip_vitb16"])
def test_model_is_per_image(family):
    model, spec = _tiny(family, ITAEOptions(theta=1.0))
    x = _images(spec, batch=4)
    theta = _gap_theta(_features(model, x)["norms"])
    _set_options(model, ITAEOptions(theta=theta, rows="all"))
    full = _features(model, x)
    assert len({tuple(r) for r in full["artifact_mask"].tolist()}) > 1, "test setup"
    for b in range(4):
        one = _features(model, x[b : b + 1])
        assert torch.equal(one["artifact_mask"], full["artifact_mask"][b : b + 1])
        torch.testing.assert_close(one["embedding"], full["embedding"][b : b + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one["x_prenorm"], full["x_prenorm"][b : b + 1], rtol=1e-5, atol=1e-5)
