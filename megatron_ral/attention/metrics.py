"""Diagnostics computed from captured attention-policy rows p [B, R, T] (no gradient needed)."""

from __future__ import annotations

import torch
from torch import Tensor


def attention_entropy(p: Tensor) -> Tensor:
    """Per-token entropy H_t = -sum_i p_t(i) ln p_t(i) (0 ln 0 = 0), shape [B, R]."""
    pos = p > 0
    logp = torch.log(torch.where(pos, p, torch.ones_like(p)))
    return -(p * logp).sum(dim=-1)


def attention_mass_shares(p: Tensor, vision_mask: Tensor, response_mask: Tensor) -> dict[str, Tensor]:
    """Share of each row's attention mass on vision tokens, text prompt tokens and response tokens.

    Args:
        p: [B, R, T] policy rows (each valid row sums to 1 over its keys).
        vision_mask: bool [B, T], True at image/video placeholder tokens.
        response_mask: bool [B, T], True at response tokens. A row sees only earlier keys of its own
            sample, so for packed streams this is the own response.

    Returns:
        {"vision", "text", "response"}: each [B, R]; text = keys that are neither vision nor response
        (system prompt, question, chat markup). They sum to the row's total mass (1, or 0 for invalid rows).
    """
    vis = vision_mask.to(p.dtype).unsqueeze(-1)  # [B, T, 1]
    resp = (response_mask & ~vision_mask).to(p.dtype).unsqueeze(-1)
    text = (~vision_mask & ~response_mask).to(p.dtype).unsqueeze(-1)
    return {
        "vision": torch.bmm(p, vis).squeeze(-1),
        "text": torch.bmm(p, text).squeeze(-1),
        "response": torch.bmm(p, resp).squeeze(-1),
    }


def masked_token_mean(values: Tensor, row_mask: Tensor | None = None) -> Tensor:
    """Mean of per-token values [B, R] over valid rows (0 if none)."""
    if row_mask is None:
        return values.mean() if values.numel() else values.new_zeros(())
    v = torch.where(row_mask, values, torch.zeros_like(values))
    return v.sum() / row_mask.sum().clamp_min(1).to(v.dtype)


def attention_metrics(
    p: Tensor,
    row_mask: Tensor | None,
    vision_mask: Tensor | None = None,
    response_mask: Tensor | None = None,
    p_old: Tensor | None = None,
) -> dict[str, float]:
    """Scalar metrics for logging: ``attn/entropy``, ``attn/vision_mass``, ``attn/text_mass``,
    ``attn/response_mass`` (when masks are given) and ``attn/jsd_old`` (when p_old is given)."""
    from megatron_ral.attention.divergence import jsd

    with torch.no_grad():
        out = {"attn/entropy": float(masked_token_mean(attention_entropy(p), row_mask))}
        if vision_mask is not None and response_mask is not None:
            for name, share in attention_mass_shares(p, vision_mask, response_mask).items():
                out[f"attn/{name}_mass"] = float(masked_token_mean(share, row_mask))
        if p_old is not None:
            out["attn/jsd_old"] = float(masked_token_mean(jsd(p, p_old.to(p.dtype)), row_mask))
    return out
