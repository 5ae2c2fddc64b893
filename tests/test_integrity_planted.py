"""Behaviours the docs promise that no test pinned (issue 22: each of these one-line bugs, planted
alone, passed the whole suite). Each test here fails with its bug planted:

- the fp32 mask margin widened to the fp16 one (onnx/validate.mask_margin);
- float32 PyTorch's distance measured without replaying the float64 mask where the masks differ
  at a tie (onnx/validate.reference_for);
- the exact-to-IVF switch one vector late (search/index.choose_kind: IVF from APPROX_MIN_VECTORS on);
- Rocchio adding the negative centroid (search/feedback.rocchio_query);
- logistic-regression labels shifted by one (search/feedback.logreg_weights: {q} + P are 1, N 0);
- the TEMI teacher using the student's temperature (cluster/heads._fit_temi).
(A manifest field present on one side only: tests/test_integrity_model.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itae_export.cluster import heads
from itae_export.onnx import validate
from itae_export.onnx.contract import FLOAT32_REACH, FP16_MASK_MARGIN_REL, MASK_MARGIN_MIN_REL
from itae_export.search.feedback import FeedbackParams, logreg_weights, rocchio_query
from itae_export.search.index import APPROX_MIN_VECTORS, choose_kind


# ---------------------------------------------------------------- the validation gate


def _ref(norm_rel_err: float) -> validate.Reference:
    z = np.zeros((1, 2))
    return validate.Reference(np.zeros((1, 3, 2, 2), np.float32), ["a"], z, z.astype(bool), None, z,
                              z.astype(bool), {"norm_rel_err": norm_rel_err})


def test_fp32_mask_margin_is_the_float32_one():
    """docs/onnx-contract.md: margin = theta * max(MIN_REL, FLOAT32_REACH * r32) for fp32; the
    fp16 floor only for fp16."""
    for r32 in (0.0, 1e-9, 1e-5):
        margin, rel = validate.mask_margin({"precision": "fp32", "itae": {"theta": 3.0}}, _ref(r32))
        assert rel == max(MASK_MARGIN_MIN_REL, FLOAT32_REACH * r32) < FP16_MASK_MARGIN_REL
        assert margin == pytest.approx(3.0 * rel, rel=1e-15)
    margin, rel = validate.mask_margin({"precision": "fp16", "itae": {"theta": 3.0}}, _ref(0.0))
    assert rel == FP16_MASK_MARGIN_REL and margin == pytest.approx(3.0 * FP16_MASK_MARGIN_REL)


class _TieModel(torch.nn.Module):
    """forward_features as validate._forward calls it: float32 puts token 1 of input 0 on the other
    side of theta than float64 does (a tie), and the artifact count moves the embedding a lot."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward_features(self, px, cls_only=True, artifact_mask=None):
        n = px.shape[0]
        norms = torch.tensor([[1.0, 2.5, 4.0]] * n, dtype=torch.float64)
        mask = norms > 2.5
        if px.dtype == torch.float32:
            mask[0, 1] = True  # float32's side of the tie
        if artifact_mask is not None:
            mask = artifact_mask.clone()
        base = px.double().mean(dim=(1, 2, 3))[:, None] * torch.ones(n, 4, dtype=torch.float64)
        emb = base + 10.0 * mask.double().sum(1, keepdim=True) + (1e-6 if px.dtype == torch.float32 else 0.0)
        return {"embedding": emb.to(px.dtype), "artifact_mask": mask, "norms": norms.to(px.dtype)}


def test_float32_distance_replays_the_float64_mask_at_a_tie():
    """float32 PyTorch is measured on its arithmetic, with float64's mask replayed where its own
    mask differs (docs/onnx-contract.md): here 1e-6 of a scale near 20, not the 10 of the flip."""
    x = np.random.default_rng(0).random((3, 3, 4, 4)).astype(np.float32)
    ref = validate.reference_for(_TieModel(), x, ["a", "b", "c"])
    assert ref.float32["mask_mismatch"] == 1
    assert (ref.mask32 != ref.mask64).sum() == 1  # the float32 run itself keeps its own mask
    assert ref.float32["rel_max_abs_diff"] < 1e-6
    assert ref.float32["min_cosine"] > 1 - 1e-9


# ---------------------------------------------------------------- search


def test_exact_to_ivf_switch_at_the_documented_size():
    """docs/search.md: --kind auto takes the exact index below APPROX_MIN_VECTORS."""
    assert choose_kind(APPROX_MIN_VECTORS - 1) == "exact"
    assert choose_kind(APPROX_MIN_VECTORS) == "ivf"
    assert choose_kind(APPROX_MIN_VECTORS, "exact") == "exact" and choose_kind(10, "ivf") == "ivf"


def test_rocchio_subtracts_the_negative_centroid():
    """q' = normalise(alpha q + beta mean(P) - gamma mean(N))."""
    e = np.eye(4, dtype=np.float32)
    p = FeedbackParams()
    got = rocchio_query(e[0], e[1][None], np.stack([e[2], e[3]]), p)
    want = p.alpha * e[0] + p.beta * e[1] - p.gamma * (e[2] + e[3]) / 2
    np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=1e-6)
    assert got[2] < 0 and got[3] < 0  # away from the irrelevant images
    only_neg = rocchio_query(e[0], np.zeros((0, 4), np.float32), e[2][None], p)
    assert only_neg[2] < 0


def test_logreg_labels_query_and_relevant_one_irrelevant_zero():
    """A logistic regression fitted on {q} + P (label 1) against N (label 0): each side scores on
    its side of 0, the query included."""
    e = np.eye(6, dtype=np.float32)
    q, pos, neg = e[0], np.stack([e[1], e[2]]), np.stack([e[3], e[4], e[5]])
    w, b = logreg_weights(q, pos, neg, c=10.0)
    assert q @ w + b > 0
    assert (pos @ w + b > 0).all()
    assert (neg @ w + b < 0).all()
    # no relevant image yet: the query alone is class 1
    w, b = logreg_weights(q, np.zeros((0, 6), np.float32), neg, c=10.0)
    assert q @ w + b > 0 and (neg @ w + b < 0).all()


# ---------------------------------------------------------------- TEMI


def test_temi_teacher_uses_its_own_temperature(monkeypatch):
    """The teacher's probabilities are softmax(logits / teacher_temp), the student's
    softmax(logits / student_temp); the kept head carries teacher_temp. At the first step the
    teacher is a copy of the student, so the teacher's probabilities follow from the student's."""
    seen = []
    real = heads.temi_loss

    def spy(s1, s2, t1, t2, marginal, beta):
        seen.append((s1.detach().clone(), t1.detach().clone()))
        return real(s1, s2, t1, t2, marginal, beta)

    monkeypatch.setattr(heads, "temi_loss", spy)
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    ts, tt = 0.2, 0.05
    res = heads.fit_head(x, 3, "temi", seed=0, progress=False, epochs=1, batch_size=40, n_heads=2, hidden_dim=16,
                         n_neighbors=3, student_temp=ts, teacher_temp=tt)
    s1, t1 = seen[0]
    logits = torch.log(s1) * ts  # student logits up to a per-row constant
    want = torch.softmax(logits / tt, dim=-1)
    torch.testing.assert_close(t1, want, rtol=1e-4, atol=1e-5)
    assert res.head.temperature == tt
