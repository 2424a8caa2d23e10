"""On-policy distillation from a larger teacher (paper §3.5): the loss terms.

    L = L_RL + mu L_GKD + gamma_attn L_AttnDistill        (algorithm.gkd_mu, algorithm.gamma_attn)

API for the teacher pass and the trainer
----------------------------------------
GKD on the output distributions (``algorithm.gkd_divergence``, ``gkd_jsd_beta``, ``gkd_top_k``):

    cfg = GKDConfig.from_config(config)            # divergence, jsd_beta, top_k, temperature
    # teacher pass (no grad), vocab-parallel logits at the response positions, [B, R, V/tp]:
    targets = gkd_teacher_targets(teacher_logits, cfg, tp_group)   # TeacherTopK (top_k > 0) or the logits
    # update, the student's vocab-parallel logits at the same positions:
    gkd = gkd_per_token(student_logits, targets, cfg, tp_group)    # [B, R], replicated on the TP ranks

  ``gkd_divergence`` (exact) and ``teacher_topk`` / ``gkd_topk_divergence`` (top-k + tail) are the pieces;
  formulas in ``distill.gkd`` and ``distill.topk``. The vocabulary is never gathered on one rank;
  ``TeacherTopK`` (ids [..., k] int64, logprobs [..., k], tail_logmass [...]) is what to store per rollout
  batch when top_k > 0 (``.to(device, dtype)``, ``[index]`` for a micro-batch's rows).

Attention distillation on the last-layer head-mean rows [B, R, T] of student and teacher:

    attention_distill_loss(p, p_teacher)          # [B, R]: JSD(p_theta^t || p_phi^t), no advantage
    attn_jsd_teacher_sums(p, p_teacher, valid)    # (sum, count) for the metric distill/attn_jsd_teacher

All are pure functions of tensors; the caller weights and normalises them (``rl.losses.aggregate``).
``distill`` never imports ``rl``.
"""

from megatron_ral.distill.attention import (
    attention_distill_loss,
    attn_jsd_teacher,
    attn_jsd_teacher_sums,
)
from megatron_ral.distill.gkd import GKD_DIVERGENCES, GKDConfig, gkd_divergence
from megatron_ral.distill.losses import gkd_per_token, gkd_teacher_targets
from megatron_ral.distill.topk import (
    TeacherTopK,
    gkd_topk_divergence,
    student_bucket_logprobs,
    teacher_topk,
)

__all__ = [
    "GKD_DIVERGENCES",
    "GKDConfig",
    "TeacherTopK",
    "attention_distill_loss",
    "attn_jsd_teacher",
    "attn_jsd_teacher_sums",
    "gkd_divergence",
    "gkd_per_token",
    "gkd_teacher_targets",
    "gkd_topk_divergence",
    "student_bucket_logprobs",
    "teacher_topk",
]
