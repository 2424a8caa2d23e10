"""Attention distillation to the teacher (paper §3.5): the student's attention policy imitates the teacher's.

    L_AttnDistill = sum_t JSD(p_theta^t || p_phi^t)    over the student's response tokens t, no advantage

p_theta^t, p_phi^t are the last-layer head-mean attention rows of response token t over the same keys
(earlier positions of the same sequence: student and teacher share tokenizer and vision patching, so the
positions align one to one), each renormalised without the diagonal (``attention.capture``). JSD is the
symmetric Jensen-Shannon divergence of ``attention.divergence.jsd``, in [0, ln 2]. The teacher's rows
carry no gradient. Shapes: rows ``[B, R, T]`` (R response rows, T keys), per-token values ``[B, R]``;
the trainer weights and normalises them like the other terms (``algorithm.attn_aggregation``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_ral.attention.divergence import jsd


def attention_distill_loss(p: Tensor, p_teacher: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """JSD(p_theta^t || p_phi^t) per response token, [B, R]; differentiable w.r.t. ``p`` only.

    ``p``: the student's rows [B, R, T]; ``p_teacher``: the teacher's [B, R, T] (any float dtype, e.g. a
    bf16 store; cast to p's). ``key_mask`` bool [B, R, T] or broadcastable (False = ignore that key).
    Zero, with zero gradient, where the rows are equal; rows of padding tokens (all zeros) give 0.
    """
    if p.shape != p_teacher.shape:
        raise ValueError(f"student rows {tuple(p.shape)} and teacher rows {tuple(p_teacher.shape)} differ in shape")
    return jsd(p, p_teacher.detach().to(p.device, p.dtype), key_mask)


@torch.no_grad()
def attn_jsd_teacher_sums(p: Tensor, p_teacher: Tensor, valid: Tensor) -> tuple[float, float]:
    """(sum of JSD(p_theta^t || p_phi^t) over the valid response tokens, their number), for the metric
    ``distill/attn_jsd_teacher`` = total sum / total count over micro-batches, stages and ranks.
    ``valid`` bool [B, R]: real response tokens of sequences that take part in the update."""
    j = jsd(p.detach(), p_teacher.to(p.device, p.dtype))
    valid = valid.to(j.device)
    return float(torch.where(valid, j, torch.zeros_like(j)).sum()), float(valid.sum())


def attn_jsd_teacher(p: Tensor, p_teacher: Tensor, valid: Tensor) -> float:
    """``distill/attn_jsd_teacher``: mean JSD(p_theta^t || p_phi^t) over the valid response tokens
    (0 when there are none)."""
    total, count = attn_jsd_teacher_sums(p, p_teacher, valid)
    return total / count if count else 0.0
