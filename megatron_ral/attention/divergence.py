"""Divergences between attention policies (rows over keys) and their aggregation over tokens.

All functions take p, q of shape [..., T] (rows of probabilities over keys, e.g. [B, R, T]) and return
one value per row ([...]). Entries outside ``mask`` are ignored; zero probabilities are handled with
the convention 0 * log 0 = 0, with finite gradients (no NaN reaches the parameters: every p here comes
out of a softmax, whose backward multiplies the gradient at a zero probability by that zero).
Natural logarithms throughout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LN2 = math.log(2.0)
AGGREGATIONS = ("token_mean", "sum")


def _safe_log(x: Tensor) -> Tensor:
    """log x where x > 0, 0 elsewhere (finite value and gradient)."""
    pos = x > 0
    return torch.where(pos, torch.log(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else torch.where(mask, x, torch.zeros_like(x))


def kl_divergence(p: Tensor, q: Tensor, mask: Tensor | None = None, eps: float = 0.0) -> Tensor:
    """KL(p || q) = sum_i p(i) ln(p(i) / q(i)) per row.

    Terms with p(i) = 0 contribute 0. Where p(i) > 0 and q(i) = 0 the divergence is infinite; ``eps``
    (default 0: no floor) floors q inside the log for callers that prefer a large finite value,
    e.g. with an old policy stored in fp16. The log of the ratio (not a difference of logs) keeps the
    precision when p and q are close, which is where RAL works.
    """
    p = _masked(p, mask)
    q = _masked(q, mask)
    pos = p > 0
    q_used = torch.where(pos, q, torch.ones_like(q))
    if eps > 0:
        q_used = torch.clamp(q_used, min=eps)
    ratio = torch.where(pos, p, torch.ones_like(p)) / q_used
    return torch.where(pos, p * torch.log(ratio), torch.zeros_like(p)).sum(dim=-1)


def jsd(p: Tensor, q: Tensor, mask: Tensor | None = None) -> Tensor:
    """Jensen-Shannon divergence per row, JSD(p || q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q)/2.

    Symmetric, in [0, ln 2], zero iff p = q. Gradient (paper §3.4): dJ/dp(i) = 1/2 ln(2 p(i) / (p(i) + q(i))).
    Computed as 1/2 sum_i [p log1p(d) + q log1p(-d)] with d = (p - q) / (p + q) (so p ln(p/m) = p log1p(d)),
    0 ln 0 = 0. This form has no cancellation between O(p ln p) terms: near p = q (where the RAL term acts,
    JSD ~ 1e-4) the textbook form 1/2 sum [p ln p + q ln q - (p+q) ln m] loses about three digits in float32.
    """
    p = _masked(p, mask)
    q = _masked(q, mask)
    s = p + q
    d = (p - q) / torch.where(s > 0, s, torch.ones_like(s))
    zero = torch.zeros_like(d)
    tp = torch.where(p > 0, p * torch.log1p(torch.where(p > 0, d, zero)), zero)
    tq = torch.where(q > 0, q * torch.log1p(torch.where(q > 0, -d, zero)), zero)
    return 0.5 * (tp + tq).sum(dim=-1)


def divergence(name: str, p: Tensor, q: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-row divergence by name: "jsd", "kl" (KL(p||q)) or "kl_reverse" (KL(q||p))."""
    if name == "jsd":
        return jsd(p, q, mask)
    if name == "kl":
        return kl_divergence(p, q, mask)
    if name == "kl_reverse":
        return kl_divergence(q, p, mask)
    raise ValueError(f"unknown divergence {name!r}; expected one of 'jsd', 'kl', 'kl_reverse'")


def aggregate_tokens(
    values: Tensor, row_mask: Tensor | None = None, mode: str = "token_mean", weights: Tensor | None = None
) -> Tensor:
    """Reduce per-token values [B, R] to a scalar.

    With w = weights (e.g. the GRPO advantage A_t of each token's response; 1 if None) and V the set of
    valid rows (``row_mask``):
        "token_mean": sum_{t in V} w_t v_t / |V|   (0 if V is empty)
        "sum":        sum_{t in V} w_t v_t
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown token aggregation {mode!r}; expected one of {AGGREGATIONS}")
    x = values if weights is None else values * weights
    if row_mask is not None:
        x = torch.where(row_mask, x, torch.zeros_like(x))
    total = x.sum()
    if mode == "sum":
        return total
    if row_mask is None:
        return total / max(values.numel(), 1)
    return total / row_mask.sum().clamp_min(1).to(total.dtype)
