"""ITAE injected into the last block: an attention module that shares the block's weights."""

from __future__ import annotations

import torch
from torch import nn

from itae_export.model import ops
from itae_export.registry import ITAEOptions


class ITAEAttention(nn.Module):
    """The last block's attention with the ITAE edit (Eq. 2-6 of the paper, docs/onnx-ops.md).

    It holds the original ``qkv`` and ``proj`` modules, so parameter names and weights stay
    those of the pretrained model. The attention is written out (no fused kernel) so that the
    logits exist as a tensor to edit and the graph exports cleanly.
    """

    def __init__(self, attn: nn.Module, options: ITAEOptions):
        super().__init__()
        self.qkv = attn.qkv
        self.proj = attn.proj
        self.num_heads = attn.num_heads
        self.options = options

    @property
    def needs_unpatched_output(self) -> bool:
        return self.options.enabled and self.options.source == "output"

    def mask_from_output(self, x_out_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source=output: plain L2 norms of the unpatched block's output tokens (no 1/sqrt(d))."""
        return torch.ops.itae.artifact_mask(x_out_BTC, self.options.theta, 1.0, self.options.group_code)

    def forward(self, x_BTC: torch.Tensor, artifact_mask=None, bypass: bool = False, cls_only: bool = False,
                unpatched: bool = False):
        """``cls_only``: the output for the CLS token alone, [B, 1, C]. The mask, the keys and
        the values still come from every token; only the CLS row of the attention is computed.
        ``unpatched`` (with ``cls_only``): also the CLS row without the ITAE edit, in
        ``aux["cls_out_unpatched"]``; the logits are shared, only the softmax row is done twice."""
        B, T, C = x_BTC.shape
        H = self.num_heads
        d = C // H
        opts = self.options
        qkv_BTC3 = self.qkv(x_BTC)
        q_BTC, k_BTC, v_BTC = qkv_BTC3.split(C, dim=-1)
        edit = opts.enabled and not bypass
        if not edit:
            mask_BN = torch.zeros((B, T - 1), dtype=torch.bool, device=x_BTC.device)
            norms_BN = None
        elif artifact_mask is not None:
            mask_BN, norms_BN = artifact_mask
        else:
            src_BTC = {"query": q_BTC, "key": k_BTC, "value": v_BTC}[opts.source]
            mask_BN, norms_BN = torch.ops.itae.artifact_mask(src_BTC, opts.theta, d**-0.5, opts.group_code)

        if cls_only:
            q_BTC = q_BTC[:, :1]
        Tq = q_BTC.shape[1]
        q_BHTD = q_BTC.reshape(B, Tq, H, d).transpose(1, 2)
        k_BHTD = k_BTC.reshape(B, T, H, d).transpose(1, 2)
        v_BHTD = v_BTC.reshape(B, T, H, d).transpose(1, 2)
        s_BHTT = (q_BHTD * d**-0.5) @ k_BHTD.transpose(-2, -1)
        aux = {}
        if unpatched and cls_only:
            o_plain_BTC = (s_BHTT.softmax(dim=-1) @ v_BHTD).transpose(1, 2).reshape(B, Tq, C)
            aux["cls_out_unpatched"] = self.proj(o_plain_BTC)
        if edit:
            s_BHTT = torch.ops.itae.attenuate_logits(s_BHTT, mask_BN, opts.strategy_code, opts.rows == "all", opts.lsa)
        a_BHTT = s_BHTT.softmax(dim=-1)
        o_BTC = (a_BHTT @ v_BHTD).transpose(1, 2).reshape(B, Tq, C)
        aux.update(artifact_mask=mask_BN, cls_attention=a_BHTT[:, :, 0])
        if norms_BN is not None:
            aux["norms"] = norms_BN
        return self.proj(o_BTC), aux


def inject_itae(model: nn.Module, options: ITAEOptions) -> nn.Module:
    """Replace the last block's attention by :class:`ITAEAttention` (in place; weights shared)."""
    last = model.blocks[-1]
    last.attn = ITAEAttention(last.attn, options)  # also re-injects over an ITAEAttention
    return model


__all__ = ["ITAEAttention", "inject_itae", "ops"]
