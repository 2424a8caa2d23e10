"""The tiny Qwen25VLModel trained with megatron-core's real DDP, (distributed) Adam, LR scheduler and
pipeline schedule, for checkpoint tests. Everything is deterministic: the same weights, batches and
layout give bit-identical steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ral.config.schema import ParallelConfig

LR = 1e-3
SEQ = 12
GLOBAL_BATCHES = 2  # micro-batches of one row per step, split over data-parallel ranks


def parallel(tp: int = 1, pp: int = 1, distributed_optimizer: bool = True) -> ParallelConfig:
    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          pipeline_layer_split=[2, 1] if pp == 2 else None,  # the tiny preset has 3 layers
                          use_distributed_optimizer=distributed_optimizer)


@dataclass
class Trainer:
    model: list  # [DistributedDataParallel]
    optimizer: object
    scheduler: object


def initialize(par: ParallelConfig) -> None:
    from megatron_ral.platform import initialize as init

    init(par, seed=5)


def build(par: ParallelConfig, seed: int) -> Trainer:
    """Model (seeded tiny weights), DDP, Adam (distributed or not), cosine schedule with warmup."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_ral.testing.models import seeded_megatron_model

    dist_opt = par.use_distributed_optimizer
    model = seeded_megatron_model("tiny", seed, par, last_layer_core_attention=None)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt),
        module=model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, min_lr=LR / 10, weight_decay=0.01, bf16=False, fp16=False,
                        clip_grad=1.0, use_distributed_optimizer=dist_opt),
        [ddp],
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=LR, min_lr=LR / 10, lr_warmup_steps=2, lr_decay_steps=10,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=10, wd_incr_style="constant")
    return Trainer([ddp], optimizer, scheduler)


def batches(step: int) -> list[dict]:
    """The global batch of a step: GLOBAL_BATCHES text rows with next-token labels."""
    from megatron_ral.testing.models import make_prompt

    out = []
    for i in range(GLOBAL_BATCHES):
        p = make_prompt([SEQ], seed=1000 * step + i)
        b = p.model_inputs()
        b.pop("attention_mask")
        b["labels"] = torch.roll(p.input_ids, -1, dims=1)
        out.append(b)
    return out


def train_step(t: Trainer, step: int) -> None:
    """One optimizer step on this data-parallel rank's share of the step's global batch."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    data = batches(step)
    mine = data[rank * len(data) // dp:(rank + 1) * len(data) // dp]

    def forward_step(it, m):
        b = dict(next(it))
        labels = b.pop("labels")
        out = m(**b, labels=labels)

        def loss_func(per_token):
            loss = per_token.mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    for chunk in t.model:
        chunk.zero_grad_buffer()
    t.optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(mine), model=t.model, num_microbatches=len(mine),
        seq_length=SEQ, micro_batch_size=1, forward_only=False,
    )
    ok, _, _ = t.optimizer.step()
    assert ok
    t.scheduler.step(increment=1)


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for c in t.model for n, p in c.module.named_parameters()}


def adam_state(t: Trainer) -> list[torch.Tensor]:
    """This rank's optimizer tensors (main params, exp_avg, exp_avg_sq, step), in optimizer order."""
    out = []
    for opt in t.optimizer.chained_optimizers:
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                st = opt.optimizer.state[p]
                out += [p.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone(),
                        torch.as_tensor(st["step"]).clone()]
    return out
