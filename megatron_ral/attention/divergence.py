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


# entries per block of rows of the fused JSD: on CPU about 128k (512 KB in float32), so a block's temporaries
# stay in cache; on an accelerator blocks only bound the temporaries' memory (32M entries, 128 MB in float32)
_JSD_BLOCK_ENTRIES = {"cpu": 1 << 17}
_JSD_BLOCK_ENTRIES_OTHER = 1 << 25
_JSD_MIN_BLOCK_ROWS = 8


def _half_log_ratios(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """(ln(p/m), ln(q/m)) with m = (p + q)/2, 0 where the probability is 0 (p ln(p/m) = 0 there).

    With d = (p - q)/(p + q): ln(p/m) = log1p(d), precise where p is close to q; where d < -1/2 (p well below
    q) log1p would amplify d's rounding (p/q below float32's epsilon rounds d to -1 exactly and log1p to -inf),
    so there ln(2p/(p + q)) is taken directly, which is precise. The same for q with -d."""
    s = p + q
    s1 = torch.where(s > 0, s, torch.ones_like(s))
    d = (p - q) / s1
    zero = torch.zeros_like(d)
    lp = torch.where(d > -0.5, torch.log1p(d), torch.log(torch.where(p > 0, 2 * p / s1, torch.ones_like(p))))
    lq = torch.where(d < 0.5, torch.log1p(-d), torch.log(torch.where(q > 0, 2 * q / s1, torch.ones_like(q))))
    return torch.where(p > 0, lp, zero), torch.where(q > 0, lq, zero)


def _blocks(rows: int, keys: int, device: torch.device):
    entries = _JSD_BLOCK_ENTRIES.get(device.type, _JSD_BLOCK_ENTRIES_OTHER)
    step = max(_JSD_MIN_BLOCK_ROWS, entries // max(keys, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


class _JSD(torch.autograd.Function):
    """Fused JSD over [N, T] rows in blocks of rows: no [N, T] temporaries kept for backward (p, q and the mask
    are saved as given), and each block's work stays in cache. Entries outside ``mask`` count as 0 in both.
    Backward: dJ/dp = 1/2 ln(p/m), dJ/dq = 1/2 ln(q/m), 0 where the probability is 0 (its softmax backward
    multiplies it by that 0) and outside the mask."""

    @staticmethod
    def forward(ctx, p: Tensor, q: Tensor, mask: Tensor | None) -> Tensor:
        out = torch.empty(p.shape[0], dtype=p.dtype, device=p.device)
        for r0, r1 in _blocks(*p.shape, p.device):
            pb, qb = _block(p, q, mask, r0, r1)
            lp, lq = _half_log_ratios(pb, qb)
            out[r0:r1] = 0.5 * (pb * lp + qb * lq).sum(dim=-1)
        ctx.save_for_backward(p, q, mask)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, q, mask = ctx.saved_tensors
        need_p, need_q = ctx.needs_input_grad[:2]
        gp = torch.empty_like(p) if need_p else None
        gq = torch.empty_like(q) if need_q else None
        for r0, r1 in _blocks(*p.shape, p.device):
            lp, lq = _half_log_ratios(*_block(p, q, mask, r0, r1))
            g = 0.5 * grad[r0:r1, None]
            if need_p:
                torch.mul(lp, g, out=gp[r0:r1])
            if need_q:
                torch.mul(lq, g, out=gq[r0:r1])
        return gp, gq, None


def _block(p: Tensor, q: Tensor, mask: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor]:
    pb, qb = p[r0:r1], q[r0:r1]
    if mask is None:
        return pb, qb
    mb = mask[r0:r1]
    return torch.where(mb, pb, torch.zeros_like(pb)), torch.where(mb, qb, torch.zeros_like(qb))


def jsd(p: Tensor, q: Tensor, mask: Tensor | None = None) -> Tensor:
    """Jensen-Shannon divergence per row, JSD(p || q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q)/2.

    Symmetric, in [0, ln 2], zero iff p = q. Gradient (paper §3.4): dJ/dp(i) = 1/2 ln(2 p(i) / (p(i) + q(i))).
    Computed as 1/2 sum_i [p ln(p/m) + q ln(q/m)] with ln(p/m) = log1p(d), d = (p - q) / (p + q), where p is
    not far below q and ln(2p/(p+q)) directly where it is (:func:`_half_log_ratios`); 0 ln 0 = 0. This form has
    no cancellation between O(p ln p) terms: near p = q (where the RAL term acts, JSD ~ 1e-4) the textbook form
    1/2 sum [p ln p + q ln q - (p+q) ln m] loses about three digits in float32; and it stays finite where one
    probability is below float32's epsilon times the other (a student's row against its teacher's).
    Fused over blocks of rows (:class:`_JSD`): no [..., T] temporaries are kept for the backward.
    """
    if q.dtype != p.dtype:
        q = q.to(p.dtype)
    if mask is None:
        p, q = torch.broadcast_tensors(p, q)
    else:
        p, q, mask = torch.broadcast_tensors(p, q, mask.to(torch.bool))
        mask = mask.reshape(-1, p.shape[-1])
    lead, keys = p.shape[:-1], p.shape[-1]
    return _JSD.apply(p.reshape(-1, keys), q.reshape(-1, keys), mask).reshape(lead)


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
