"""Supervised fine-tuning as a loss of the same trainer: cross-entropy on the target tokens only.

A loader batch in "sft" mode holds prompt + target (``process`` + ``solution`` under the think template,
``solution`` only under answer_only) with the target's position known. It is cast as a rollout batch of
one "response" per prompt (the target), so SFT runs through the same micro-batches, schedule, optimizer
step and non-finite guard as the RL updates:

    L = sum over target tokens of -log pi_theta(y_t | y_<t, x)  /  (target tokens in the global batch)
"""

from __future__ import annotations

import torch

from megatron_ral.data.collate import Batch
from megatron_ral.inference.prompts import PromptInput
from megatron_ral.rl import losses as L
from megatron_ral.rl.batch import RolloutBatch
from megatron_ral.rl.metrics import MetricSums
from megatron_ral.rl.optim_step import StepOutcome, optimizer_step, zero_grads
from megatron_ral.rl.packing import PackingSettings, plan_step_micro_batches
from megatron_ral.rl.rollout import prompts_of
from megatron_ral.rl.schedule import PassContext, run_pass
from megatron_ral.rl.update import losses_finite, minibatch_normalisers
from megatron_ral.rl.vision import encode_prompts_vision


def sft_batch(batch: Batch, image_token_id: int, video_token_id: int, merge_size: int = 2) -> RolloutBatch:
    """The loader's SFT batch as prompts + one target "response" each."""
    full = prompts_of(batch, image_token_id, video_token_id, merge_size)
    prompts, targets = [], []
    for seq, plen in zip(full, batch.prompt_lengths.tolist()):
        prompts.append(PromptInput(seq.input_ids[:plen], seq.pixel_values, seq.image_grid_thw,
                                   seq.pixel_values_videos, seq.video_grid_thw, seq.second_per_grid_ts))
        targets.append([seq.input_ids[plen:]])
    n = len(prompts)
    zeros = torch.zeros(n, 1)
    return RolloutBatch(prompts=prompts, records=list(batch.records), prompt_keys=list(range(n)), responses=targets,
                        texts=[[""] for _ in range(n)], finish_reasons=[["target"] for _ in range(n)],
                        rewards=zeros, accuracy=zeros, format=zeros, advantages=zeros.clone(),
                        zero_std=torch.zeros(n, dtype=torch.bool))


def sft_step(ctx: PassContext, batch: Batch, optimizer, scheduler, micro_batch_size: int, pad_token_id: int,
             dp_group=None, packing: PackingSettings | None = None) -> tuple[StepOutcome, MetricSums]:
    """One optimizer step of target-token cross-entropy on a loader batch (this data-parallel rank's part),
    in right-padded micro-batches of ``micro_batch_size`` sequences or, with ``packing`` ("sequences"),
    packed streams of at most its token budget."""
    inner = ctx.model[0].module if hasattr(ctx.model[0], "module") else ctx.model[0]
    rollout = sft_batch(batch, inner.image_token_id, inner.video_token_id)
    rollout.micro_batches = plan_step_micro_batches(rollout, 1, micro_batch_size, pad_token_id, packing=packing)
    norms = minibatch_normalisers(rollout.micro_batches, dp_group)[0]
    ctx = PassContext(model=ctx.model, vision=encode_prompts_vision(inner, rollout.prompts), capture=None,
                      temperature=1.0)

    def consume(mb, token_loss, result):
        logp = mb.token_logprobs(token_loss)
        valid = (mb.response_mask & (mb.weight[:, None] > 0)).to(logp.device)
        loss = L.aggregate(L.token_cross_entropy(logp), L.token_weights(valid, "token_mean"), norms["tokens"])
        # metric tensors, read once per step (MetricSums)
        return loss, {"loss/sft": loss.detach(), "loss/tokens": valid.sum()}

    zero_grads(ctx.model, optimizer)
    for m in ctx.model:
        m.train()
    outputs = run_pass(ctx, rollout.micro_batches, consume, forward_only=False)
    sums = MetricSums()
    for m in outputs:
        for k, v in m.items():
            sums.add(k, v, 0.0)
    finite = losses_finite([{"loss/total": m["loss/sft"]} for m in outputs])
    return optimizer_step(ctx.model, optimizer, scheduler, loss_finite=finite), sums
