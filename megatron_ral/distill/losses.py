"""The distillation terms as the trainer composes them (L = L_RL + mu L_GKD + gamma_attn L_AttnDistill).

Per-token values only; the trainer weights them with ``rl.losses.token_weights`` and divides by the
global normaliser (``rl.losses.aggregate``), like the policy and attention terms.
"""

from __future__ import annotations

from torch import Tensor

from megatron_ral.distill.gkd import GKDConfig, gkd_divergence
from megatron_ral.distill.topk import TeacherTopK, gkd_topk_divergence, teacher_topk


def gkd_teacher_targets(teacher_logits: Tensor, cfg: GKDConfig, tp_group=None) -> Tensor | TeacherTopK:
    """What the teacher pass keeps of its vocab-parallel logits [..., V/tp] for the GKD term: the top-k
    and tail (``TeacherTopK``) when ``cfg.top_k`` > 0, else the logits themselves, detached (use them in
    the same mini-batch: a whole rollout batch's full-vocabulary logits do not fit in memory)."""
    if cfg.top_k > 0:
        return teacher_topk(teacher_logits, cfg.top_k, cfg.temperature, tp_group)
    return teacher_logits.detach()


def gkd_per_token(student_logits: Tensor, teacher: Tensor | TeacherTopK, cfg: GKDConfig, tp_group=None) -> Tensor:
    """L_GKD per response token, [...]: ``cfg.divergence`` between softmax(student / T) and the teacher's
    distribution, exact over the vocabulary (``teacher`` = vocab-parallel logits [..., V/tp]) or over the
    teacher's top-k + tail buckets (``teacher`` = ``TeacherTopK``, ``cfg.top_k`` > 0). Differentiable
    w.r.t. ``student_logits`` (this rank's shard); the value is replicated on the TP ranks."""
    if isinstance(teacher, TeacherTopK):
        if cfg.top_k != teacher.k:
            raise ValueError(f"the teacher's targets hold the top {teacher.k} ids, the GKD config asks for "
                             f"top_k = {cfg.top_k}")
        return gkd_topk_divergence(student_logits, teacher, cfg.divergence, cfg.jsd_beta, cfg.temperature, tp_group)
    if cfg.top_k > 0:
        raise ValueError(f"GKD top_k = {cfg.top_k} needs the teacher's TeacherTopK, got full logits")
    return gkd_divergence(student_logits, teacher, cfg.divergence, cfg.jsd_beta, cfg.temperature, tp_group)
