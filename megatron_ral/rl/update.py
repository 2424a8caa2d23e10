"""The policy update: one optimizer step per mini-batch of a rollout batch (GRPO / RAL / RAL + distillation).

Per mini-batch the loss composed from ``rl.losses`` and ``distill`` is

    L = agg_pol[ clip_surrogate(rho, A) + beta * k3(logp, ref_logp) ]
        + lambda_attn * agg_attn[ A * D(p_theta^t || p_old^t) ]
        + mu * agg_pol[ D_gkd(p_theta(.|y_<t) || p_phi(.|y_<t)) ]          (ral_distill, gkd_mu > 0)
        + gamma_attn * agg_attn[ JSD(p_theta^t || p_phi^t) ]                (ral_distill, gamma_attn > 0)

(no advantage on the two distillation terms: pure imitation of the teacher phi on the student's own
trajectories), with the aggregations' normalisers counted over the global mini-batch
(:func:`minibatch_normalisers`), so the loss does not depend on the micro-batch size or on the
data-parallel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_ral.attention.divergence import jsd
from megatron_ral.distill.attention import attention_distill_loss
from megatron_ral.distill.gkd import GKDConfig
from megatron_ral.distill.losses import gkd_per_token
from megatron_ral.rl import losses as L
from megatron_ral.rl.batch import MicroBatch, RolloutBatch
from megatron_ral.rl.metrics import MetricSums
from megatron_ral.rl.optim_step import StepOutcome, optimizer_step, uses_loss_scaling, zero_grads
from megatron_ral.rl.passes import attention_diagnostics, diagnostic_sequences, has_diagnostic_sequences
from megatron_ral.rl.schedule import PassContext, run_pass


LOSS_TERMS = ("policy", "attn", "gkd", "distill_attn")
"""The weighted terms of the mini-batch loss, in the order they are added: the policy term (clipped
surrogate + beta k3), lambda_attn x the RAL attention term, mu x GKD, gamma_attn x attention distillation."""


@dataclass(frozen=True)
class LossSettings:
    """The loss hyper-parameters (from AlgorithmConfig / GenerationConfig)."""

    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    kl_beta: float = 0.0
    kl_clamp: float | None = None
    loss_aggregation: str = "token_mean"
    max_new_tokens: int = 512
    lambda_attn: float = 0.0
    attn_divergence: str = "jsd"
    attn_aggregation: str = "token_mean"
    gkd_mu: float = 0.0
    gamma_attn: float = 0.0
    gkd: GKDConfig = GKDConfig()

    @classmethod
    def from_config(cls, algorithm, generation, use_attention: bool) -> "LossSettings":
        distill = algorithm.name == "ral_distill"
        return cls(
            clip_eps=algorithm.clip_eps, clip_eps_high=algorithm.clip_eps_high, kl_beta=algorithm.kl_beta,
            kl_clamp=algorithm.kl_clamp,
            loss_aggregation=algorithm.loss_aggregation, max_new_tokens=generation.max_new_tokens,
            lambda_attn=algorithm.lambda_attn if use_attention else 0.0,
            attn_divergence=algorithm.attn_divergence, attn_aggregation=algorithm.attn_aggregation,
            gkd_mu=algorithm.gkd_mu if distill else 0.0, gamma_attn=algorithm.gamma_attn if distill else 0.0,
            gkd=GKDConfig(divergence=algorithm.gkd_divergence, jsd_beta=algorithm.gkd_jsd_beta,
                          top_k=algorithm.gkd_top_k, temperature=generation.temperature or 1.0),
        )


@dataclass
class DistillInputs:
    """The distillation terms' inputs of one micro-batch (last pipeline stage).

    student_logits: the student's vocab-parallel logits at the response positions [B, R, V/TP] (with their
        graph; unscaled) when gkd_mu > 0. teacher: the teacher's logits at the same positions, or its
        ``TeacherTopK``. teacher_rows: p_phi [B, R, T] when gamma_attn > 0. tp_group: the group the
        vocabulary is split over.
    """

    student_logits: torch.Tensor | None = None
    teacher: object = None
    teacher_rows: torch.Tensor | None = None
    tp_group: object = None


@dataclass
class TeacherTargets:
    """What the teacher pass left for the updates of one mini-batch: the p_phi store (gamma_attn > 0) and,
    per micro-batch index, the teacher's GKD targets (logits or top-k + tail; gkd_mu > 0)."""

    rows: object = None
    gkd: dict = field(default_factory=dict)
    tp_group: object = None


def minibatch_normalisers(micro_batches: list[MicroBatch], dp_group=None) -> dict[int, dict[str, float]]:
    """{minibatch: {"tokens": counted response tokens, "sequences": counted sequences}} over the global
    mini-batch (summed over data-parallel ranks; pipeline/tensor peers hold the same micro-batches)."""
    ids = sorted({mb.minibatch for mb in micro_batches})
    counts = torch.zeros(len(ids), 2, dtype=torch.float64)
    pos = {m: i for i, m in enumerate(ids)}
    for mb in micro_batches:
        counts[pos[mb.minibatch], 0] += mb.num_tokens
        counts[pos[mb.minibatch], 1] += mb.num_sequences
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        if dist.get_backend(dp_group) == "nccl":
            counts = counts.cuda()
        dist.all_reduce(counts, group=dp_group)
        counts = counts.cpu()
    values = counts.tolist()  # one read
    return {m: {"tokens": values[i][0], "sequences": values[i][1]} for m, i in pos.items()}


def minibatch_loss(mb: MicroBatch, logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                   rows: torch.Tensor | None, p_old: torch.Tensor | None, norms: dict[str, float],
                   s: LossSettings, distill: DistillInputs | None = None,
                   per_row=None, only: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the mini-batch loss, and its metric sums (detached 0-d tensors on the
    loss's device: reading them is left to the step, once, see ``MetricSums``).

    ``rows``: the student's attention rows p_theta (used by the RAL term with ``p_old`` and by the attention
    distillation term with ``distill.teacher_rows``). Each term is added only when its weight is > 0 and
    its inputs are given; with gkd_mu = gamma_attn = 0 the loss is the GRPO / RAL loss.
    ``only`` (one of ``LOSS_TERMS``): return that weighted term alone as the loss (the gradient-norm
    diagnostic, :func:`term_grad_norms`); the metrics are the same as without it.
    ``per_row`` (``CaptureResult.per_row``): maps per-row values of the captured rows to the batch's [B, R]
    (under context parallelism ``rows``, ``p_old`` and the teacher's rows are this rank's share of the rows
    and the divergences are summed over the CP group there); None: the rows are the batch's."""
    dev = logp.device
    valid = (mb.response_mask & (mb.weight[:, None] > 0)).to(dev)
    adv = mb.advantages.to(dev)
    pg, clipped = L.clipped_surrogate(logp, old_logp.to(dev), adv, s.clip_eps, s.clip_eps_high)
    w = L.token_weights(valid, s.loss_aggregation, s.max_new_tokens)
    d_pol = norms[L.normaliser_kind(s.loss_aggregation)]
    per_token = pg
    metrics = {"loss/policy": L.aggregate(pg.detach(), w, d_pol),
               "loss/clip_tokens": (clipped & valid).sum(), "loss/tokens": valid.sum()}
    if ref_logp is not None and s.kl_beta > 0:
        kl = L.k3_kl(logp, ref_logp.to(dev), s.kl_clamp)
        per_token = pg + s.kl_beta * kl
        metrics["loss/kl"] = L.aggregate(kl.detach(), w, d_pol)
    parts = {"policy": L.aggregate(per_token, w, d_pol)}
    if rows is not None and p_old is not None and s.lambda_attn > 0:
        # the RAL term A_t * D(p_theta^t || p_old^t) (L.attention_loss); D is kept for the jsd_old metric
        if per_row is not None:
            # context parallelism: rows and p_old are this rank's share of the rows; per_row sums over the group
            p_v, old_v = rows, p_old.to(rows.device, rows.dtype)
            d_v = L.attention_divergence(p_v, old_v, s.attn_divergence)
            attn = per_row(adv.to(rows.dtype)[:, None] * d_v)
        else:
            # over the counted rows only ([N, T] of the [B, R, T] rows; padding rows carry no loss), indexed from
            # the host mask (no device read)
            b_idx, r_idx = (i.to(rows.device) for i in torch.nonzero(mb.response_mask & (mb.weight[:, None] > 0),
                                                                      as_tuple=True))
            p_v, old_v = rows[b_idx, r_idx], p_old.to(rows.device, rows.dtype)[b_idx, r_idx]
            d_v = L.attention_divergence(p_v, old_v, s.attn_divergence)
            attn = d_v.new_zeros(valid.shape).index_put((b_idx, r_idx), adv.to(rows.dtype)[b_idx] * d_v)
        wa = L.token_weights(valid, s.attn_aggregation)
        la = L.aggregate(attn, wa, norms[L.normaliser_kind(s.attn_aggregation)])
        parts["attn"] = s.lambda_attn * la
        metrics["loss/attn"] = la.detach()
        with torch.no_grad():
            j = d_v.detach() if s.attn_divergence == "jsd" else jsd(p_v.detach(), old_v)
            if per_row is not None:
                j = per_row(j)
                metrics["attn/jsd_old"] = torch.where(valid, j, torch.zeros_like(j)).sum()
            else:
                metrics["attn/jsd_old"] = j.sum()
            metrics["attn/jsd_tokens"] = valid.sum()
    if distill is not None and s.gkd_mu > 0 and distill.student_logits is not None and distill.teacher is not None:
        g = gkd_per_token(distill.student_logits, distill.teacher, s.gkd, distill.tp_group).to(logp.dtype)
        lg = L.aggregate(g, w, d_pol)
        parts["gkd"] = s.gkd_mu * lg
        metrics["loss/gkd"] = lg.detach()
        metrics["distill/gkd"] = torch.where(valid, g.detach(), torch.zeros_like(g)).sum()
        metrics["distill/gkd_tokens"] = valid.sum()
    if distill is not None and s.gamma_attn > 0 and rows is not None and distill.teacher_rows is not None:
        jt = attention_distill_loss(rows, distill.teacher_rows.to(rows.device, rows.dtype))  # JSD per token
        if per_row is not None:
            jt = per_row(jt)
        wa = L.token_weights(valid, s.attn_aggregation)
        ld = L.aggregate(jt, wa, norms[L.normaliser_kind(s.attn_aggregation)])
        parts["distill_attn"] = s.gamma_attn * ld
        metrics["loss/distill_attn"] = ld.detach()
        metrics["distill/attn_jsd_teacher"] = torch.where(valid, jt.detach(), torch.zeros_like(jt)).sum()
        metrics["distill/attn_tokens"] = valid.sum()
    loss = parts["policy"]
    for name in LOSS_TERMS[1:]:
        if name in parts:
            loss = loss + parts[name]
    metrics["loss/total"] = loss.detach()
    if only is not None:
        if only not in LOSS_TERMS:
            raise ValueError(f"minibatch_loss: unknown term {only!r} (known: {', '.join(LOSS_TERMS)})")
        loss = parts[only] if only in parts else loss * 0.0
    return loss, metrics


def policy_update(ctx: PassContext, batch: RolloutBatch, micro_batches: list[MicroBatch], optimizer, scheduler,
                  settings: LossSettings, norms: dict[str, float], store=None, use_old_logprobs: bool = True,
                  diagnostics: tuple[int, int] | None = None,
                  teacher: TeacherTargets | None = None) -> tuple[StepOutcome, MetricSums]:
    """One optimizer step on the mini-batch made of ``micro_batches``.

    ``use_old_logprobs`` False (a single update per rollout batch) takes the old log-probs as the
    current ones detached (rho = 1): the same loss value and gradient without an old pass; this first
    forward's log-probs are kept as the batch's old log-probs (for the rollout consistency check).
    ``diagnostics`` (image, video token ids): also compute the attention diagnostics of the current
    policy (a no-grad capture when the loss itself needs none). ``teacher``: the teacher's targets of
    these micro-batches for the distillation terms (the student's logits at the response positions are
    then returned by its forward when gkd_mu > 0, its rows captured with gradients when gamma_attn > 0).
    """
    sums = MetricSums()
    loss_fn = _LossFn(batch, settings, norms, store, use_old_logprobs, diagnostics, teacher)
    zero_grads(ctx.model, optimizer)
    for model in ctx.model:
        model.train()
    outputs = run_pass(ctx, micro_batches, loss_fn.consume, forward_only=False, capture_kwargs=loss_fn.capture_kwargs,
                       return_logits=loss_fn.use_gkd)
    for m in outputs:
        for k, v in m.items():
            sums.add(k, v, 0.0)
    outcome = optimizer_step(ctx.model, optimizer, scheduler, loss_finite=losses_finite(outputs))
    return outcome, sums


def _extra_terms(settings: LossSettings, store, teacher: TeacherTargets | None) -> tuple[bool, bool, bool]:
    """Whether the attention, GKD and attention-distillation terms are added (weight > 0 and inputs given)."""
    return (settings.lambda_attn > 0 and store is not None, teacher is not None and settings.gkd_mu > 0,
            teacher is not None and settings.gamma_attn > 0 and teacher.rows is not None)


def active_terms(settings: LossSettings, store=None, teacher: TeacherTargets | None = None) -> list[str]:
    """The terms of ``LOSS_TERMS`` that this configuration adds to the loss."""
    return ["policy"] + [t for t, on in zip(LOSS_TERMS[1:], _extra_terms(settings, store, teacher)) if on]


def term_grad_norms(ctx: PassContext, batch: RolloutBatch, micro_batches: list[MicroBatch], optimizer,
                    settings: LossSettings, norms: dict[str, float], store=None, use_old_logprobs: bool = True,
                    teacher: TeacherTargets | None = None) -> dict[str, float]:
    """{term: ||grad of that weighted term alone||} at the current weights, for each active term of the
    mini-batch loss (``LOSS_TERMS``): one forward/backward over ``micro_batches`` per term, the gradient
    reduced over data-parallel ranks by the schedule as in an update, its norm computed by the optimizer
    over the model-parallel group (tensor-parallel duplicates and shared embeddings counted once, as for
    ``train/grad_norm``). A diagnostic: the gradients are zeroed afterwards, no weight, optimizer state or
    schedule changes, the update that follows is the same as without it. Not for fp16 (the optimizer's
    gradient preparation would move its loss scaler; the config refuses the pair)."""
    if uses_loss_scaling(optimizer):
        raise ValueError("term_grad_norms: not available with a loss-scaled (fp16) optimizer")
    out: dict[str, float] = {}
    for term in active_terms(settings, store, teacher):
        loss_fn = _LossFn(batch, settings, norms, store, use_old_logprobs, None, teacher, only=term)
        zero_grads(ctx.model, optimizer)
        for model in ctx.model:
            model.train()
        run_pass(ctx, micro_batches, loss_fn.consume, forward_only=False, capture_kwargs=loss_fn.capture_kwargs,
                 return_logits=loss_fn.use_gkd)
        optimizer.prepare_grads()
        norm = optimizer.get_grad_norm()
        out[term] = float(norm) if norm is not None else math.nan
    zero_grads(ctx.model, optimizer)
    return out


class _LossFn:
    """The per-micro-batch loss of an update (``consume`` for ``run_pass``) and the capture it needs."""

    def __init__(self, batch, settings: LossSettings, norms, store, use_old_logprobs: bool, diagnostics,
                 teacher: TeacherTargets | None, only: str | None = None):
        self.batch, self.settings, self.norms, self.store = batch, settings, norms, store
        self.use_old_logprobs, self.diagnostics, self.teacher, self.only = use_old_logprobs, diagnostics, teacher, only
        self.use_attention, self.use_gkd, self.use_distill_attn = _extra_terms(settings, store, teacher)

    def capture_kwargs(self, mb):
        if self.use_attention or self.use_distill_attn:
            return {"grad": True}
        if self.diagnostics is not None and has_diagnostic_sequences(self.batch, mb):
            return {"grad": False}
        return None

    def consume(self, mb, token_loss, result, logits=None):
        batch, settings, store, teacher = self.batch, self.settings, self.store, self.teacher
        use_attention, use_gkd, use_distill_attn = self.use_attention, self.use_gkd, self.use_distill_attn
        logp = mb.token_logprobs(token_loss)
        if self.use_old_logprobs:
            old = batch.old_logprobs[mb.index]
        else:
            old = logp.detach()
            if self.only is None:
                batch.old_logprobs.setdefault(mb.index, old.float())
        rows = result.rows if (result is not None and result.active) else None
        p_old = store.get(mb.index, device=logp.device) if (use_attention and rows is not None) else None
        per_row = result.per_row if rows is not None else None
        distill = None
        if teacher is not None:
            distill = DistillInputs(
                student_logits=mb.to_rows(logits) if use_gkd else None,  # [B, R, V/TP] (packed: scattered)
                teacher=teacher.gkd.get(mb.index) if use_gkd else None,
                teacher_rows=teacher.rows.get(mb.index, device=logp.device) if (use_distill_attn and rows is not None)
                else None,
                tp_group=teacher.tp_group)
        loss, metrics = minibatch_loss(mb, logp, old, batch.ref_logprobs.get(mb.index),
                                       rows if (use_attention or use_distill_attn) else None, p_old, self.norms,
                                       settings, distill, per_row, only=self.only)
        diagnostics = self.diagnostics
        if diagnostics is not None and rows is not None and has_diagnostic_sequences(batch, mb):
            with torch.no_grad():
                metrics.update(attention_diagnostics(rows.detach(), mb, *diagnostics, diagnostic_sequences(batch, mb),
                                                     per_row))
        return loss, metrics


def losses_finite(outputs: list[dict]) -> bool:
    """Whether every micro-batch's ``loss/total`` is finite: one host read for the whole pass."""
    totals = [m["loss/total"] for m in outputs if "loss/total" in m]
    if not totals:
        return True
    if not isinstance(totals[0], torch.Tensor):
        return all(math.isfinite(t) for t in totals)
    return bool(torch.isfinite(torch.stack([t.reshape(()) for t in totals])).all())
