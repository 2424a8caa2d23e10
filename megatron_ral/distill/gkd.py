"""Generalised knowledge distillation (GKD) on vocabulary-parallel logits: per-token divergences.

Notation: at each response position, p = p_theta = softmax(z_student / T) (the student, trained) and
q = p_phi = softmax(z_teacher / T) (the teacher, no gradient) over the vocabulary v, T the sampling
temperature (the policy's log-probs use the same scaling). Natural logarithms.

    reverse_kl   KL(p || q) = sum_v p(v) ln(p(v) / q(v))          (default: the paper's "typically";
                                                                   mode-seeking, the student's own samples)
    forward_kl   KL(q || p) = sum_v q(v) ln(q(v) / p(v))          (mean-seeking)
    jsd          JSD_beta(p || q) = beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q,
                 0 < beta < 1 (``gkd_jsd_beta``, default 0.5). Zero iff p = q; bounded by the binary
                 entropy h(beta) = -beta ln beta - (1 - beta) ln(1 - beta) (ln 2 at beta = 0.5, where it is
                 the symmetric Jensen-Shannon divergence of ``attention.divergence.jsd``). Small beta:
                 JSD_beta / beta -> KL(p || q); beta -> 1: JSD_beta / (1 - beta) -> KL(q || p).
                 (This is GKD's JSD(beta) with P = student, Q = teacher; TRL's ``beta`` weighs the other way.)

Not to be confused with ``algorithm.attn_divergence``, whose "kl" is KL(p_theta || p_old) and "reverse_kl"
is KL(p_old || p_theta) on attention rows.

Evaluation: each divergence is a sum of per-entry terms that are each >= 0 and depend on the ratio
delta = ln q(v) - ln p(v) (for KL(p || q): p (e^delta - 1 - delta), which sums to the KL because both
distributions sum to 1; for JSD_beta: beta p ln(p / m) + (1 - beta) q ln(q / m) from log1p / expm1 of delta).
So no value is negative, near p = q there is no cancellation between large terms, and an error in a
log-normaliser (a common shift of delta) changes the value only to second order. Entries with p = 0 or
q = 0 follow 0 ln 0 = 0 (a KL is +inf where its first argument has mass the second lacks).

Tensor parallelism: logits are ``[..., V/tp]`` per rank in megatron's vocab-parallel layout (see
``distill.vocab_parallel``); the normalisers come from a MAX and a SUM all-reduce and the per-token value
from one more SUM all-reduce of per-rank partial sums, so the vocabulary is never gathered. The value is
replicated on the TP ranks (megatron's loss convention: every TP rank backpropagates the same loss) and
each rank's backward produces the exact gradient of its own shard, analytically, without communication:

    d KL(p||q) / dz_v = p_v (ln(p_v / q_v) - KL(p||q)) / T
    d KL(q||p) / dz_v = (p_v - q_v) / T
    d JSD_beta / dz_v = beta p_v (ln(p_v / m_v) - KL(p||m)) / T

Returned values are per token ``[...]``; the caller aggregates them with the project's token weights and
global normalisers (``rl.losses.token_weights`` / ``aggregate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_ral.distill.vocab_parallel import (
    all_reduce_,
    log_softmax_pair,
    scaled_logits,
)

GKD_DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


@dataclass(frozen=True)
class GKDConfig:
    """What the GKD term computes.

    divergence: "reverse_kl" (KL(student || teacher)), "forward_kl" (KL(teacher || student)) or "jsd"
        (JSD_beta, see the module docstring).
    jsd_beta: beta of "jsd", in (0, 1); 0.5 is the symmetric JSD.
    top_k: 0 = the exact divergence over the whole vocabulary; k > 0 = over the teacher's top-k ids plus one
        tail bucket (``distill.topk``).
    temperature: T of softmax(z / T) for both models (the rollout's sampling temperature).
    """

    divergence: str = "reverse_kl"
    jsd_beta: float = 0.5
    top_k: int = 0
    temperature: float = 1.0

    def __post_init__(self):
        if self.divergence not in GKD_DIVERGENCES:
            raise ValueError(f"GKDConfig.divergence must be one of {GKD_DIVERGENCES}; got {self.divergence!r}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"GKDConfig.jsd_beta must be in (0, 1); got {self.jsd_beta}")
        if self.top_k < 0:
            raise ValueError(f"GKDConfig.top_k must be >= 0 (0 = exact); got {self.top_k}")
        if not self.temperature > 0:
            raise ValueError(f"GKDConfig.temperature must be > 0; got {self.temperature}")

    @classmethod
    def from_config(cls, cfg) -> GKDConfig:
        """From a validated ``config.Config``: ``algorithm.gkd_divergence / gkd_jsd_beta / gkd_top_k`` and
        ``generation.temperature`` (0, greedy, scores at T = 1 like the trainer's log-probs)."""
        a = cfg.algorithm
        return cls(divergence=a.gkd_divergence, jsd_beta=a.gkd_jsd_beta, top_k=a.gkd_top_k,
                   temperature=cfg.generation.temperature or 1.0)


# ----------------------------------------------------------------------------- per-entry terms (forward)
def kl_terms(logp: Tensor, logq: Tensor) -> Tensor:
    """Per-entry terms of KL(p || q) from log-probs, each >= 0, summing to the KL:

        p (e^d - 1 - d),  d = ln q - ln p     where p > 0   (computed as q - p - p d when d > 1)
        q                                     where p = 0
    """
    p, q = torch.exp(logp), torch.exp(logq)
    pos = p > 0
    d = torch.where(pos, logq - logp, torch.zeros_like(logp))
    small = d <= 1.0
    d_small = torch.where(small, d, torch.zeros_like(d))
    t = torch.where(small, p * (torch.expm1(d_small) - d_small), q - p - p * d)
    return torch.where(pos, t, q).clamp_min(0.0)


def jsd_log_ratios(logp: Tensor, logq: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """x = ln(p / m) and y = ln(q / m), m = beta p + (1 - beta) q, accurate for p close to q.

    With d = ln q - ln p: for d <= 0, x = -log1p((1 - beta) expm1(d)); for d > 0, y = -log1p(beta expm1(-d));
    and y = x + d. Where p = 0: x is -inf and y = -ln(1 - beta); where q = 0: x = -ln beta, y = -inf.
    """
    both = (logp > float("-inf")) & (logq > float("-inf"))
    d = torch.where(both, logq - logp, torch.zeros_like(logp))
    neg = d <= 0
    d_neg = torch.where(neg, d, torch.zeros_like(d))
    d_pos = torch.where(neg, torch.zeros_like(d), d)
    x_neg = -torch.log1p((1.0 - beta) * torch.expm1(d_neg))
    y_pos = -torch.log1p(beta * torch.expm1(-d_pos))
    x = torch.where(neg, x_neg, y_pos - d_pos)
    y = torch.where(neg, x_neg + d_neg, y_pos)
    p_only = logq == float("-inf")
    q_only = logp == float("-inf")
    x = torch.where(p_only, torch.full_like(x, -math.log(beta)), torch.where(q_only, torch.full_like(x, float("-inf")), x))
    y = torch.where(q_only, torch.full_like(y, -math.log1p(-beta)), torch.where(p_only, torch.full_like(y, float("-inf")), y))
    return x, y


def jsd_terms(logp: Tensor, logq: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Per-entry terms of JSD_beta(p || q), each >= 0: beta p ln(p/m) + (1 - beta) q ln(q/m) (0 ln 0 = 0);
    and the entries p ln(p/m) of KL(p || m) (needed by the gradient)."""
    p, q = torch.exp(logp), torch.exp(logq)
    x, y = jsd_log_ratios(logp, logq, beta)
    zero = torch.zeros_like(p)
    px = torch.where(p > 0, p * x, zero)
    qy = torch.where(q > 0, q * y, zero)
    return (beta * px + (1.0 - beta) * qy).clamp_min(0.0), px


# ----------------------------------------------------------------------------- the autograd function
class _VocabParallelDivergence(torch.autograd.Function):
    """Per-token divergence of softmax(student / T) and softmax(teacher / T) over a vocab-split axis."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, name: str, beta: float, temperature: float, group):
        s = scaled_logits(student, temperature)
        t = scaled_logits(teacher, temperature).to(s.dtype)
        logp, logq = log_softmax_pair(s, t, group)
        del s, t
        if name == "reverse_kl":
            local = kl_terms(logp, logq).sum(-1, keepdim=True)
        elif name == "forward_kl":
            local = kl_terms(logq, logp).sum(-1, keepdim=True)
        else:
            terms, px = jsd_terms(logp, logq, beta)
            local = torch.stack([terms.sum(-1), px.sum(-1)], dim=-1)
        total = all_reduce_(local.contiguous(), group)
        value = total[..., 0]
        ctx.save_for_backward(logp, logq, total[..., -1])
        ctx.name, ctx.beta, ctx.temperature, ctx.dtype = name, beta, temperature, student.dtype
        return value

    @staticmethod
    def backward(ctx, grad_value: Tensor):
        logp, logq, aux = ctx.saved_tensors  # aux: KL(p||q) (reverse_kl) or KL(p||m) (jsd), replicated
        p = torch.exp(logp)
        zero = torch.zeros_like(p)
        if ctx.name == "reverse_kl":
            ratio = torch.where(p > 0, logp - logq, zero)
            grad = torch.where(p > 0, p * (ratio - aux[..., None]), zero)
        elif ctx.name == "forward_kl":
            grad = p - torch.exp(logq)
        else:
            x, _ = jsd_log_ratios(logp, logq, ctx.beta)
            grad = torch.where(p > 0, ctx.beta * p * (x - aux[..., None]), zero)
        grad = grad * (grad_value.to(grad.dtype)[..., None] / ctx.temperature)
        return grad.to(ctx.dtype), None, None, None, None, None


def gkd_divergence(student_logits: Tensor, teacher_logits: Tensor, divergence: str = "reverse_kl",
                   jsd_beta: float = 0.5, temperature: float = 1.0, tp_group=None) -> Tensor:
    """Exact per-token GKD divergence D(p_theta || p_phi) over the whole vocabulary, ``[...]``.

    ``student_logits`` / ``teacher_logits``: ``[..., V/tp]`` this rank's vocabulary shard at the same
    positions (the model's vocab-parallel logits at ``loss_index``), unscaled; any float dtype (computed in
    float32, float64 kept). ``divergence`` one of ``GKD_DIVERGENCES`` (formulas in the module docstring).
    ``tp_group``: the tensor-parallel group the vocabulary is split over (None: the whole vocabulary is
    here). Differentiable w.r.t. ``student_logits`` only; the teacher's logits carry no gradient. The
    value is the same on every TP rank. Padding positions may hold anything finite: weight them out.
    """
    if divergence not in GKD_DIVERGENCES:
        raise ValueError(f"unknown GKD divergence {divergence!r}; expected one of {GKD_DIVERGENCES}")
    if not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1); got {jsd_beta}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    return _VocabParallelDivergence.apply(student_logits, teacher_logits, divergence, float(jsd_beta),
                                          float(temperature), tp_group)
