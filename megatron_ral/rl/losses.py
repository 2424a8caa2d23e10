"""The training losses as pure functions of tensors; the trainer only composes them.

Shapes: per-token tensors are ``[B, R]`` over the response tokens of B sequences (row r = response
token r; rows past a response's length are padding and carry weight 0). ``A`` is the sequence-level
GRPO advantage ``[B]``.

Aggregation is explicit: a per-token weight ``w`` (0 on padding) and a normaliser ``D`` that the caller
computes over the *global* mini-batch (every micro-batch, pipeline stage and data-parallel rank), so the
loss of a mini-batch does not depend on how it is split:

    aggregate(x) = sum_{b, r} w[b, r] x[b, r] / D

    token_mean                w = 1             D = number of response tokens in the global mini-batch
    seq_mean_token_mean       w = 1 / |o_b|     D = number of sequences in the global mini-batch
    seq_mean_token_sum_norm   w = 1 / L_max     D = number of sequences   (Dr. GRPO; L_max = max_new_tokens)
    sum (attention term)      w = 1             D = number of sequences   (sum over t, mean over responses)

Summing ``aggregate`` over the micro-batches and ranks of a mini-batch gives the mini-batch loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_ral.attention.divergence import jsd, kl_divergence

POLICY_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
ATTENTION_AGGREGATIONS = ("token_mean", "sum")
ATTENTION_DIVERGENCES = ("jsd", "kl", "reverse_kl")


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float,
                      clip_high: float | None = None) -> tuple[Tensor, Tensor]:
    """PPO/GRPO clipped surrogate per token, negated for minimisation.

        rho = exp(logp - old_logp)
        loss = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))   ( = -min(A rho, A clip(rho)) )

    ``advantages`` is [B] (broadcast over tokens) or [B, R]. Returns (loss [B, R], clipped [B, R] bool:
    tokens where the clipped branch is the active one, i.e. the gradient is zero).
    """
    clip_high = clip_low if clip_high is None else clip_high
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def k3_kl(logp: Tensor, ref_logp: Tensor, clamp: float | None = None) -> Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) per token (Schulman): exp(d) - d - 1 with d = ref - logp.

    Non-negative, zero iff logp = ref_logp, unbiased for the KL when tokens are sampled from pi_theta.
    It grows like e^d: a token the policy now finds far less likely than the reference does (d ~ 90 in
    float32) gives inf. ``clamp`` c > 0 bounds the log-ratio before k3 is formed, d -> clip(d, -c, c),
    so each token's value is at most e^c - c - 1 (and at least e^-c + c - 1), and a token whose log-ratio
    lies beyond the bound contributes a constant: no KL gradient. The k3 value itself is not clipped
    (verl clips d at +-20 and then k3 at +-10). None or 0: no bound.
    """
    delta = ref_logp - logp
    if clamp:
        delta = delta.clamp(-clamp, clamp)
    return torch.exp(delta) - delta - 1.0


def attention_divergence(p: Tensor, p_old: Tensor, name: str = "jsd", mask: Tensor | None = None) -> Tensor:
    """D(p_theta^t || p_old^t) per row [..., T] -> [...]: "jsd" (paper), "kl" = KL(p || p_old),
    "reverse_kl" = KL(p_old || p)."""
    if name == "jsd":
        return jsd(p, p_old, mask)
    if name == "kl":
        return kl_divergence(p, p_old, mask)
    if name == "reverse_kl":
        return kl_divergence(p_old, p, mask)
    raise ValueError(f"unknown attention divergence {name!r}; expected one of {ATTENTION_DIVERGENCES}")


def attention_loss(p: Tensor, p_old: Tensor, advantages: Tensor, name: str = "jsd",
                   mask: Tensor | None = None) -> Tensor:
    """RAL term per response token (paper Eq. 3): A_t * D(p_theta^t || p_old^t), [B, R].

    ``p``, ``p_old`` are the attention-policy rows [B, R, T]; ``advantages`` [B] is the sequence advantage
    (the same for every token of a response). Not clipped. With A > 0 minimising it pulls p_theta toward
    p_old (the rollout's pattern); with A < 0 it pushes p_theta away. Zero, with zero gradient, at
    p_theta = p_old (the first update after a rollout).
    """
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    return adv.to(p.dtype) * attention_divergence(p, p_old, name, mask)


def token_cross_entropy(logp: Tensor) -> Tensor:
    """SFT loss per target token: -log pi_theta(y_t | y_<t, x)."""
    return -logp


def token_weights(response_mask: Tensor, aggregation: str, max_new_tokens: int | None = None) -> Tensor:
    """Per-token weights ``w`` [B, R] of an aggregation (see the module docstring); 0 on padding rows."""
    mask = response_mask.to(torch.float64)
    if aggregation in ("token_mean", "sum"):
        w = mask
    elif aggregation == "seq_mean_token_mean":
        w = mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    elif aggregation == "seq_mean_token_sum_norm":
        if not max_new_tokens or max_new_tokens < 1:
            raise ValueError("seq_mean_token_sum_norm needs max_new_tokens >= 1")
        w = mask / float(max_new_tokens)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    return w


def normaliser_kind(aggregation: str) -> str:
    """What the global normaliser D of an aggregation counts: "tokens" or "sequences"."""
    if aggregation == "token_mean":
        return "tokens"
    if aggregation in ("seq_mean_token_mean", "seq_mean_token_sum_norm", "sum"):
        return "sequences"
    raise ValueError(f"unknown aggregation {aggregation!r}")


def aggregate(values: Tensor, weights: Tensor, normaliser: float) -> Tensor:
    """sum_{b,r} w[b,r] values[b,r] / D (a scalar; padding rows have w = 0 and may hold anything finite)."""
    if normaliser <= 0:
        return values.sum() * 0.0
    w = weights.to(values.dtype)
    return torch.where(w != 0, values * w, torch.zeros_like(values)).sum() / normaliser
