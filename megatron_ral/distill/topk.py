"""GKD over the teacher's top-k tokens plus one tail bucket (``algorithm.gkd_top_k`` = k > 0).

The teacher pass keeps, per response token, only the k most likely ids under the teacher, their log-probs
and the log of the remaining mass (``TeacherTopK``: O(k) numbers per token instead of the vocabulary).
In the update both distributions are coarse-grained onto the same k + 1 buckets, the k ids and "any other
token":

    P(j) = p_theta(id_j),  P(tail) = 1 - sum_j p_theta(id_j)      (the student, from its full logits)
    Q(j) = p_phi(id_j),    Q(tail) = 1 - sum_j p_phi(id_j)        (the teacher, stored)

and the GKD divergence (``distill.gkd``) is taken between P and Q. Both are proper distributions, so the
value is a true divergence: >= 0, zero iff P = Q, and the student cannot lower it by shrinking its own
top-k mass (which a KL over renormalised top-k distributions would allow). Since KL and JSD_beta are
f-divergences, coarse-graining can only lower them: 0 <= D_k <= D_k' <= D_exact for k <= k' (the
top-k sets are nested), with D_V = D_exact at k = V. The error against the exact value is measured by
``megatron_ral/bench/gkd_topk.py`` (README, "Distillation").

Tail masses are computed as log-sum-exps over the non-top-k entries of the full logits, with the tail's
own maximum (not as 1 - sum, which cancels when the top-k mass is close to 1, nor relative to the global
maximum, which underflows for a peaked distribution): accurate log-masses down to any size, and exactly
0 (log-mass -inf) when k = V.

Under tensor parallelism (vocab-parallel logits ``[..., V/tp]``, see ``distill.vocab_parallel``): the
teacher's top-k is each rank's local top-k, an all-gather of those values and ids, and a global top-k; its
normaliser and tail come from one SUM all-reduce (the global maximum and the tail's maximum are the best and
the (k+1)-th best of the gathered values, so each rank gathers k + 1). The student's bucket log-probs come
from one MAX all-reduce (2 numbers per token: the maximum and the tail's maximum) and one SUM all-reduce
(k + 2 numbers per token: the k logits, the normaliser and the tail); their backward is local to each shard.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from megatron_ral.distill.gkd import GKD_DIVERGENCES, gkd_divergence
from megatron_ral.distill.vocab_parallel import (
    all_gather_last,
    all_reduce_,
    global_max,
    group_size,
    member_mask,
    scaled_logits,
    shard_start,
)


@dataclass
class TeacherTopK:
    """The teacher's top-k distribution per token, ready to be stored with a rollout batch.

    ids: int64 [..., k] global vocabulary ids, most likely first.
    logprobs: [..., k] ln p_phi(id) at ``temperature`` (normalised over the whole vocabulary).
    tail_logmass: [...] ln(1 - sum_j p_phi(id_j)), the mass of every other id (-inf when k = V).
    temperature: the T the log-probs were computed at (the student must use the same).
    """

    ids: Tensor
    logprobs: Tensor
    tail_logmass: Tensor
    temperature: float = 1.0

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def bucket_logprobs(self) -> Tensor:
        """[..., k + 1]: the k log-probs, then the tail's log-mass."""
        return torch.cat([self.logprobs, self.tail_logmass[..., None].to(self.logprobs.dtype)], dim=-1)

    def to(self, device=None, dtype: torch.dtype | None = None) -> TeacherTopK:
        """Moved to ``device``; the float fields cast to ``dtype`` (ids stay int64)."""
        return replace(self, ids=self.ids.to(device), logprobs=self.logprobs.to(device, dtype),
                       tail_logmass=self.tail_logmass.to(device, dtype))

    def __getitem__(self, index) -> TeacherTopK:
        """The same index applied to the token dimensions (e.g. a micro-batch's sequences)."""
        return replace(self, ids=self.ids[index], logprobs=self.logprobs[index],
                       tail_logmass=self.tail_logmass[index])


def _check_k(k: int, vocab: int) -> None:
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k needs 1 <= k <= vocabulary size ({vocab}); got k = {k}")


@torch.no_grad()
def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0, tp_group=None) -> TeacherTopK:
    """The teacher's global top-k ids, their log-probs and the tail log-mass from vocab-parallel logits.

    ``teacher_logits`` [..., V/tp] (unscaled; divided by ``temperature`` here). Ties between equal logits
    may pick either id. The result is identical on every TP rank.
    """
    z = scaled_logits(teacher_logits, temperature)
    local_vocab = z.shape[-1]
    vocab = local_vocab * group_size(tp_group)
    _check_k(k, vocab)
    start = shard_start(local_vocab, tp_group)
    # one more than k: the (k+1)-th best logit is the tail's maximum (its log-sum-exp then cannot underflow)
    vals, idx = torch.topk(z, min(k + 1, local_vocab), dim=-1)
    vals = all_gather_last(vals, tp_group)
    ids = all_gather_last(idx + start, tp_group)
    top, pos = torch.topk(vals, min(k + 1, vocab), dim=-1)
    ids = ids.gather(-1, pos[..., :k])
    m = _finite_or_zero(top[..., :1])
    m_tail = _finite_or_zero(top[..., k:k + 1]) if k < vocab else torch.zeros_like(m)
    mask, _, _ = member_mask(ids, start, local_vocab)
    tail = torch.exp(torch.where(mask, torch.full_like(z, float("-inf")), z) - m_tail).sum(-1)
    sums = all_reduce_(torch.stack([torch.exp(z - m).sum(-1), tail], dim=-1), tp_group)
    log_total = m[..., 0] + torch.log(sums[..., 0])
    log_tail = m_tail[..., 0] + torch.log(sums[..., 1])
    return TeacherTopK(ids=ids, logprobs=top[..., :k] - log_total[..., None], tail_logmass=log_tail - log_total,
                       temperature=float(temperature))


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class _StudentBuckets(torch.autograd.Function):
    """ln P over the k given ids and the tail bucket, from vocab-parallel student logits."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, temperature: float, group):
        z = scaled_logits(logits, temperature)
        local_vocab = z.shape[-1]
        mask, inside, local = member_mask(ids, shard_start(local_vocab, group), local_vocab)
        z_tail = torch.where(mask, torch.full_like(z, float("-inf")), z)
        m, m_tail = global_max(z, z_tail, group=group)  # the tail's own maximum: no underflow of its sum
        picked = torch.where(inside, z.gather(-1, local.clamp(max=local_vocab - 1)), torch.zeros_like(ids, dtype=z.dtype))
        sums = torch.cat([picked, torch.exp(z - m[..., None]).sum(-1, keepdim=True),
                          torch.exp(z_tail - m_tail[..., None]).sum(-1, keepdim=True)], dim=-1)
        del z_tail
        sums = all_reduce_(sums, group)  # one id's logit comes from exactly one rank
        log_total = m + torch.log(sums[..., -2])
        log_tail = m_tail + torch.log(sums[..., -1])  # -inf when every id is a top-k id
        out = torch.cat([sums[..., :-2] - log_total[..., None], (log_tail - log_total)[..., None]], dim=-1)
        ctx.save_for_backward(z, mask, inside, local, log_total, log_tail)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # d ln P(j) / dz_v = [v = id_j] - p_v;  d ln P(tail) / dz_v = [v not in ids] p_v / P(tail) - p_v
        z, mask, inside, local, log_total, log_tail = ctx.saved_tensors
        g = grad_out.to(z.dtype)
        grad = -torch.exp(z - log_total[..., None]) * g.sum(-1, keepdim=True)
        tail_ok = torch.isfinite(log_tail)[..., None] & ~mask
        share = torch.exp(torch.where(tail_ok, z - log_tail[..., None], torch.full_like(z, float("-inf"))))
        grad = grad + share * g[..., -1:]
        spare = torch.zeros(*grad.shape[:-1], 1, dtype=grad.dtype, device=grad.device)
        top_g = torch.where(inside, g[..., :-1], torch.zeros_like(g[..., :-1]))
        grad = torch.cat([grad, spare], dim=-1).scatter_add(-1, local, top_g)[..., :-1] / ctx.temperature
        return grad.to(ctx.dtype), None, None, None


def student_bucket_logprobs(student_logits: Tensor, ids: Tensor, temperature: float = 1.0, tp_group=None) -> Tensor:
    """ln P [..., k + 1] of the student over the buckets (ids [..., k] global, then the tail), from its
    vocab-parallel logits [..., V/tp]; differentiable w.r.t. the logits (each rank its own shard's
    gradient, the value replicated on the TP ranks). The tail is ln sum_{v not in ids} p_theta(v)."""
    if ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"top-k ids {tuple(ids.shape)} do not match student logits {tuple(student_logits.shape)}")
    _check_k(ids.shape[-1], student_logits.shape[-1] * group_size(tp_group))
    return _StudentBuckets.apply(student_logits, ids.to(torch.int64), float(temperature), tp_group)


def gkd_topk_divergence(student_logits: Tensor, teacher: TeacherTopK, divergence: str = "reverse_kl",
                        jsd_beta: float = 0.5, temperature: float = 1.0, tp_group=None) -> Tensor:
    """Per-token GKD divergence D(P || Q) over the k + 1 buckets, ``[...]`` (see the module docstring).

    ``student_logits`` [..., V/tp] vocab-parallel, unscaled; ``teacher`` from ``teacher_topk`` at the same
    ``temperature``. Differentiable w.r.t. the student's logits; replicated on the TP ranks.
    """
    if divergence not in GKD_DIVERGENCES:
        raise ValueError(f"unknown GKD divergence {divergence!r}; expected one of {GKD_DIVERGENCES}")
    if abs(teacher.temperature - temperature) > 1e-12:
        raise ValueError(f"the teacher's top-k was computed at temperature {teacher.temperature}, "
                         f"the student's log-probs use {temperature}")
    log_p = student_bucket_logprobs(student_logits, teacher.ids.to(student_logits.device), temperature, tp_group)
    log_q = teacher.bucket_logprobs().to(log_p.device, log_p.dtype)
    # ln P and ln Q are normalised: the exact divergence of their softmax (T = 1, no split) is D(P || Q).
    return gkd_divergence(log_p, log_q, divergence, jsd_beta, 1.0, None)
