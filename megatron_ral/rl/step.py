"""One RL step (GRPO / RAL / RAL + distillation): rollout -> score -> old / reference [/ teacher] passes ->
updates -> metrics.

    result = rl_step(ctx, loader_batch, step, next_batch)

Every phase is a function of its own module; this one only orders them and turns their outputs into
the step's metrics. All ranks call it (it is collective). ``next_batch()`` gives further loader batches
when dynamic sampling draws more prompts (``rl.dynamic_sampling``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from megatron_ral.attention.old_policy import OldPolicyConfig, make_old_policy_store
from megatron_ral.data.collate import Batch
from megatron_ral.data.records import PROBLEM_TYPES
from megatron_ral.rl.consistency import LogprobDiffWarning, consistency_sums
from megatron_ral.rl.dynamic_sampling import GroupFilter, draw_groups, round_keys
from megatron_ral.rl.metrics import MetricSums, PeakMemory, Timer
from megatron_ral.rl.optim_step import uses_loss_scaling
from megatron_ral.rl.packing import PackingSettings, plan_step_micro_batches
from megatron_ral.rl.passes import old_pass, reference_pass
from megatron_ral.rl.rollout import RolloutSettings, generate_rollouts, global_prompt_keys, prompts_of
from megatron_ral.rl.schedule import PassContext
from megatron_ral.rl.teacher_phase import TeacherPhase, TeacherSetup
from megatron_ral.rl.update import LossSettings, minibatch_normalisers, policy_update, term_grad_norms
from megatron_ral.rl.vision import encode_prompts_vision


@dataclass
class RLContext:
    """Everything an RL step uses, built once by the trainer."""

    passes: PassContext                 # model chunks, attention capture, temperature
    model: object                       # the unwrapped Qwen25VLModel of this stage
    optimizer: object
    scheduler: object
    rollout: RolloutSettings
    loss: LossSettings
    tokenizer: object
    stop_token_ids: list[int]
    suppress_token_ids: list[int]
    pad_token_id: int
    updates_per_rollout: int
    epochs_per_rollout: int
    micro_batch_size: int
    group_filter: GroupFilter = field(default_factory=GroupFilter)   # zero-variance groups: drop / refill
    packing: PackingSettings | None = None   # packed streams (training.packing); None: padded micro-batches
    reference: object = None            # ReferenceWeights when kl_beta > 0
    old_policy: OldPolicyConfig | None = None   # p_old store when the attention term is on
    logprob_warning: LogprobDiffWarning | None = None   # warns once when generation and training disagree
    teacher: TeacherSetup | None = None         # the distillation teacher (ral_distill)
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: object = None
    tp_group: object = None
    cp_group: object = None             # context-parallel group (None at CP = 1): generators sharing the prompts
    rollout_owner: bool = True          # model-parallel rank 0 of its data-parallel group
    loss_owner: bool = True             # tensor-parallel (and context-parallel) rank 0 of the last pipeline stage
    term_grad_interval: int = 0         # every this many steps: each loss term's gradient norm alone (0: never)


@dataclass
class StepResult:
    metrics: dict
    updates: int = 0
    skipped_updates: int = 0            # non-finite loss or gradient (the trainer's stop rule counts them)
    loss_scale_skips: int = 0           # fp16 gradient overflows (the loss scaler's business)
    samples: list = field(default_factory=list)


def _rollout_metrics(batch, sums: MetricSums) -> None:
    lengths = batch.response_lengths()
    sums.add("reward/total", float(batch.rewards.double().sum()), batch.rewards.numel())
    sums.add("reward/accuracy", float(batch.accuracy.double().sum()), batch.accuracy.numel())
    sums.add("reward/format", float(batch.format.double().sum()), batch.format.numel())
    sums.add("response/length_mean", float(lengths.sum()), lengths.numel())
    truncated = sum(r == "length" for row in batch.finish_reasons for r in row)
    sums.add("response/truncated_frac", float(truncated), lengths.numel())
    sums.add("adv/zero_std_groups", float(batch.zero_std.sum()), 0.0)
    sums.add("adv/groups", float(batch.num_prompts), 0.0)
    # pass@G on the step's prompts: the share of groups with at least one correct response
    sums.add("reward/pass_at_g", float((batch.accuracy >= 1.0).any(dim=1).sum()), batch.num_prompts)
    sums.add("perf/gen_tokens", float(batch.generated_tokens), 0.0)
    for p, record in enumerate(batch.records):
        sums.add(f"reward/accuracy_by_type/{record.problem_type}", float(batch.accuracy[p].double().sum()),
                 batch.accuracy.shape[1])


def _distill_metrics(total: MetricSums, n_updates: int, timer: Timer, meter: PeakMemory) -> dict:
    """The distillation metrics of a step: the terms as in the loss (mean over the updates) and the mean
    divergences to the teacher per response token over every update; the teacher's time and memory (the
    largest over the ranks)."""
    peak = torch.tensor([meter.gib["teacher"]], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            peak = peak.cuda()
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return {
        "loss/gkd": total.total("loss/gkd") / n_updates,
        "loss/distill_attn": total.total("loss/distill_attn") / n_updates,
        "distill/gkd": total.total("distill/gkd") / max(total.total("distill/gkd_tokens"), 1.0),
        "distill/attn_jsd_teacher": (total.total("distill/attn_jsd_teacher")
                                     / max(total.total("distill/attn_tokens"), 1.0)),
        "perf/teacher_s": timer.seconds["teacher"],
        "perf/teacher_peak_mem_gib": float(peak.item()),
    }


def loss_scale_metrics(optimizer, loss_scale_skips: int, loss_scale: float) -> dict:
    """fp16 only: train/loss_scale (at the end of the step) and train/loss_scale_skips (overflowed updates)."""
    if not uses_loss_scaling(optimizer):
        return {}
    return {"train/loss_scale": float(loss_scale), "train/loss_scale_skips": float(loss_scale_skips)}


def term_grad_metrics(norms: dict[str, float]) -> dict:
    """``diag/grad_norm/<term>`` for each active loss term and ``diag/grad_ratio/<term>`` = its norm over
    the policy term's (how strongly each extra term pulls against the policy gradient, weight included)."""
    out = {f"diag/grad_norm/{t}": v for t, v in norms.items()}
    policy = norms.get("policy", float("nan"))
    for t, v in norms.items():
        if t != "policy":
            out[f"diag/grad_ratio/{t}"] = v / policy if policy > 0 else float("nan")
    return out


def _more(next_batch: Callable[[], Batch] | None) -> Batch:
    if next_batch is None:
        raise ValueError("dynamic sampling draws further prompts: rl_step needs next_batch")
    return next_batch()


def rl_step(ctx: RLContext, loader_batch: Batch, step: int,
            next_batch: Callable[[], Batch] | None = None) -> StepResult:
    timer, meter = Timer(), PeakMemory()
    t_step = time.perf_counter()
    model = ctx.model
    drawn_sums = MetricSums()    # rollout metrics over every drawn group (kept or not)
    target = len(loader_batch) * ctx.dp_size

    def generate_round(k: int):
        source = loader_batch if k == 0 else _more(next_batch)
        prompts = prompts_of(source, model.image_token_id, model.video_token_id)
        keys = round_keys(global_prompt_keys(len(prompts), ctx.dp_rank, ctx.dp_size), k, len(prompts) * ctx.dp_size)
        out = generate_rollouts(model, prompts, source.records, keys, ctx.tokenizer, ctx.rollout, step,
                                ctx.stop_token_ids, ctx.suppress_token_ids, ctx.cp_group)
        if ctx.rollout_owner:
            _rollout_metrics(out, drawn_sums)
        return out

    # 1. rollouts with the current weights (every rank of the model-parallel group gets the same tokens), in
    #    rounds while dynamic sampling wants more informative groups; the kept groups spread over DP ranks
    with timer("gen"):
        drawn = draw_groups(ctx.group_filter, target, generate_round, ctx.dp_rank, ctx.dp_size, ctx.dp_group)
    batch = drawn.batch
    prompts = batch.prompts

    # 2. the step's micro-batches: mini-batch m of the (prompt-major) sequences, micro_batch_size each or
    #    packed streams of at most the token budget
    minibatches = ctx.updates_per_rollout // ctx.epochs_per_rollout
    batch.micro_batches = plan_step_micro_batches(batch, minibatches, ctx.micro_batch_size, ctx.pad_token_id,
                                                  ctx.group_filter.drop_zero_std, ctx.packing)
    norms = minibatch_normalisers(batch.micro_batches, ctx.dp_group)
    passes = PassContext(model=ctx.passes.model, vision=encode_prompts_vision(model, prompts),
                         capture=ctx.passes.capture, temperature=ctx.passes.temperature)

    # 3. old policy (log-probs, p_old) and reference (log-probs) without gradients
    store = make_old_policy_store(ctx.old_policy, ctx.tp_group) if ctx.old_policy is not None else None
    need_old = ctx.updates_per_rollout > 1 or store is not None
    loss_sums = MetricSums()
    with timer("old_pass"):
        if need_old:
            for m in old_pass(passes, batch, store, model.image_token_id, model.video_token_id):
                loss_sums.add_all(m, 0.0)
    with timer("ref_pass"):
        if ctx.reference is not None:
            reference_pass(passes, batch, ctx.reference)
    # ... and the teacher (rows and top-k kept for the batch; exact GKD logits come per mini-batch below)
    teacher = TeacherPhase(ctx.teacher, prompts, batch, timer, meter) if ctx.teacher is not None else None

    # 4. updates: epochs x mini-batches optimizer steps
    skipped, scale_skips, grad_norms, lrs, loss_scale = 0, 0, [], [], 1.0
    teacher_before_updates = timer.seconds["teacher"]
    with timer("update"):
        update = 0
        diagnose = ctx.term_grad_interval > 0 and step % ctx.term_grad_interval == 0
        for _epoch in range(ctx.epochs_per_rollout):
            for mbs in batch.minibatches():
                targets = teacher.targets(mbs) if teacher is not None else None
                if diagnose and update == ctx.updates_per_rollout - 1:
                    # the last update of the step: after the others moved the weights (the attention term's
                    # gradient is zero by construction on the first one)
                    with timer("term_grads"):
                        term_norms = term_grad_norms(passes, batch, mbs, ctx.optimizer, ctx.loss,
                                                     norms[mbs[0].minibatch], store, use_old_logprobs=need_old,
                                                     teacher=targets)
                outcome, sums = policy_update(
                    passes, batch, mbs, ctx.optimizer, ctx.scheduler, ctx.loss, norms[mbs[0].minibatch], store,
                    use_old_logprobs=need_old,
                    diagnostics=None if need_old else (model.image_token_id, model.video_token_id),
                    teacher=targets)
                if update == 0:  # zero by construction on the first update (theta = theta_old)
                    for key in ("attn/jsd_old", "attn/jsd_tokens"):
                        sums.sums.pop(key, None)
                        sums.counts.pop(key, None)
                loss_sums.merge(sums)
                skipped += 0 if outcome.stepped or outcome.loss_scale_skipped else 1
                scale_skips += 1 if outcome.loss_scale_skipped else 0
                loss_scale = outcome.loss_scale
                if outcome.stepped:
                    grad_norms.append(outcome.grad_norm)
                lrs.append(outcome.lr)
                update += 1
    if store is not None:
        store.clear()
    if teacher is not None:
        teacher.close()

    # 5. metrics, summed over the ranks that own them
    sums = MetricSums()
    sums.merge(drawn_sums)
    if ctx.rollout_owner:
        sums.add("perf/token_positions", float(sum(mb.token_positions for mb in batch.micro_batches)), 0.0)
    if ctx.loss_owner:
        sums.merge(loss_sums)
        sums.merge(consistency_sums(batch))    # generator vs old pass (or the first update's forward)
    total = sums.all_reduce()
    n_updates = ctx.updates_per_rollout
    tokens = max(total.total("loss/tokens"), 1.0)
    metrics = {k: total.mean(k) for k in ("reward/total", "reward/accuracy", "reward/format", "response/length_mean",
                                          "response/truncated_frac", "reward/pass_at_g")}
    for t in PROBLEM_TYPES:
        key = f"reward/accuracy_by_type/{t}"
        if total.counts.get(key, 0) > 0:
            metrics[key] = total.mean(key)
    metrics.update({
        "adv/zero_std_groups": total.total("adv/zero_std_groups"),
        "adv/groups_drawn": float(drawn.groups_drawn),
        "adv/groups_dropped": float(drawn.groups_dropped),
        "adv/sampling_rounds": float(drawn.rounds),
        "loss/policy": total.total("loss/policy") / n_updates,
        "loss/kl": total.total("loss/kl") / n_updates,
        "loss/attn": total.total("loss/attn") / n_updates,
        "loss/total": total.total("loss/total") / n_updates,
        "loss/clip_frac": total.total("loss/clip_tokens") / tokens,
        "attn/jsd_old": total.total("attn/jsd_old") / max(total.total("attn/jsd_tokens"), 1.0),
        "attn/entropy": total.total("attn/entropy") / max(total.total("attn/tokens"), 1.0),
        "attn/vision_mass": total.total("attn/vision_mass") / max(total.total("attn/tokens"), 1.0),
        "rollout/logprob_diff_max": total.peak("rollout/logprob_diff_max"),
        "rollout/logprob_diff_mean": total.mean("rollout/logprob_diff"),
        "train/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
        "train/lr": lrs[-1] if lrs else 0.0,
        "train/skipped_updates": float(skipped),
        **loss_scale_metrics(ctx.optimizer, scale_skips, loss_scale),
        "perf/gen_s": timer.seconds["gen"],
        "perf/old_pass_s": timer.seconds["old_pass"],
        "perf/ref_pass_s": timer.seconds["ref_pass"],
        "perf/update_s": timer.seconds["update"] - (timer.seconds["teacher"] - teacher_before_updates),
        "perf/gen_tokens_per_s": total.total("perf/gen_tokens") / max(timer.seconds["gen"], 1e-9),
        "perf/token_positions": total.total("perf/token_positions"),  # of one pass over the batch (padding included)
        "perf/step_s": time.perf_counter() - t_step,
    })
    if diagnose:
        metrics.update(term_grad_metrics(term_norms))
        metrics["perf/term_grads_s"] = timer.seconds["term_grads"]
        metrics["perf/update_s"] -= timer.seconds["term_grads"]
    if ctx.logprob_warning is not None:
        ctx.logprob_warning.check(metrics["rollout/logprob_diff_max"], metrics["rollout/logprob_diff_mean"], step,
                                  emit=not dist.is_initialized() or dist.get_rank() == 0)
    if ctx.teacher is not None:
        metrics.update(_distill_metrics(total, n_updates, timer, meter))
    samples = [(r.problem_id, batch.texts[p][0], float(batch.rewards[p, 0])) for p, r in enumerate(batch.records[:2])]
    return StepResult(metrics=metrics, updates=n_updates, skipped_updates=skipped, loss_scale_skips=scale_skips,
                      samples=samples)
