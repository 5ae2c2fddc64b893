"""The two ITAE steps as PyTorch custom ops (namespace ``itae``).

They are the reference math for eager PyTorch and the export boundary: the ONNX exporter
translates each call into one node of the ``itae`` ONNX domain (itae_export.onnx.functions),
whose body is the same computation written in ONNX. docs/onnx-ops.md is the contract.
"""

from __future__ import annotations

import torch

from itae_export.registry import GROUP_CODES, STRATEGY_CODES

# the integer attributes, from the one table in the registry (shared with the ONNX functions)
GROUP_MINORITY, GROUP_BELOW, GROUP_ABOVE = (GROUP_CODES[g] for g in ("minority", "below", "above"))
STRATEGY_MIN, STRATEGY_NEG_INF, STRATEGY_MEAN = (STRATEGY_CODES[s] for s in ("min", "neg-inf", "mean"))


def token_norms(x_BTC: torch.Tensor, scale: float) -> torch.Tensor:
    """Norms of every non-CLS token, in float32 (float64 for a float64 input, the validation
    reference): ||x[b, t, :] * scale||_2 for t >= 1."""
    y = x_BTC[:, 1:].to(torch.promote_types(x_BTC.dtype, torch.float32)) * scale
    return (y * y).sum(-1).sqrt()


@torch.library.custom_op("itae::artifact_mask", mutates_args=())
def artifact_mask(x_BTC: torch.Tensor, theta: float, scale: float, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2-4: the artifact mask [B, T-1] (bool) and the norms [B, T-1] (float32)."""
    norms_BN = token_norms(x_BTC, scale)
    return mask_from_norms(norms_BN, theta, group), norms_BN


def mask_from_norms(norms_BN: torch.Tensor, theta: float, group: int) -> torch.Tensor:
    """Eq. 3-4 on precomputed norms [B, N]: the artifact mask (bool)."""
    below_BN = norms_BN <= theta
    above_BN = ~below_BN
    if group == GROUP_BELOW:
        return below_BN
    if group == GROUP_ABOVE:
        return above_BN
    n_below = below_BN.sum(1, keepdim=True)
    n_above = above_BN.sum(1, keepdim=True)
    # argmin of Eq. 3 takes La on a tie; one empty group means no artifacts
    minority_BN = torch.where(n_below <= n_above, below_BN, above_BN)
    return minority_BN & (n_below > 0) & (n_above > 0)


@artifact_mask.register_fake
def _(x_BTC, theta, scale, group):
    B, T, _ = x_BTC.shape
    return x_BTC.new_empty((B, T - 1), dtype=torch.bool), x_BTC.new_empty((B, T - 1), dtype=torch.float32)


@torch.library.custom_op("itae::attenuate_logits", mutates_args=())
def attenuate_logits(
    s_BHQT: torch.Tensor, mask_BN: torch.Tensor, strategy: int, all_rows: bool, lsa: bool
) -> torch.Tensor:
    """Eq. 5-6: substitute the logits of artifact columns in the edited rows.

    Rows edited: row 0 (the CLS query) only, or every row when ``all_rows``. With ``lsa`` the
    diagonal of the edited rows is set to -inf first (Table A3).
    """
    Q, T = s_BHQT.shape[-2:]
    rows_Q = torch.arange(Q, device=s_BHQT.device)
    edit_rows_Q1 = ((rows_Q == 0) | all_rows)[:, None]
    s = s_BHQT
    if lsa:
        diag_QT = rows_Q[:, None] == torch.arange(T, device=s.device)[None, :]
        s = s.masked_fill(diag_QT & edit_rows_Q1, float("-inf"))
    cand = s[..., 1:]
    if strategy == STRATEGY_MIN:
        sub = cand.amin(-1, keepdim=True)
    elif strategy == STRATEGY_NEG_INF:
        sub = torch.full_like(s[..., :1], float("-inf"))
    else:
        sub = cand.mean(-1, keepdim=True)
    cols_BT = torch.cat([torch.zeros_like(mask_BN[:, :1]), mask_BN], dim=1)
    edit_B1QT = cols_BT[:, None, None, :] & edit_rows_Q1[None, None]
    return torch.where(edit_B1QT, sub, s)


@attenuate_logits.register_fake
def _(s_BHQT, mask_BN, strategy, all_rows, lsa):
    return torch.empty_like(s_BHQT)
