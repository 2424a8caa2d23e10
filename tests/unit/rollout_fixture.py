"""A small rollout batch for trainer-pass tests: standard tiny prompts (image, text, video) with seeded
random responses, planned into mini-batches and micro-batches as the trainer does."""

from __future__ import annotations

import torch

from megatron_ral.testing.attention import random_response
from megatron_ral.testing.inference import standard_prompts
from megatron_ral.rl.batch import RolloutBatch, plan_micro_batches


def tiny_rollouts(kinds: tuple[str, ...], response_lengths: tuple[int, ...], advantages: list[list[float]],
                  minibatches: int, micro_batch_size: int, pad_token_id: int = 0, seed: int = 0) -> RolloutBatch:
    """One prompt per entry of ``kinds`` ("image", "text", "video"), one response per entry of
    ``response_lengths`` for each prompt, ``advantages`` [P][G]."""
    prompts = [standard_prompts()[k] for k in kinds]
    responses = [[torch.tensor(random_response(n, seed=seed + 10 * p + g)) for g, n in enumerate(response_lengths)]
                 for p in range(len(prompts))]
    shape = (len(prompts), len(response_lengths))
    z = torch.zeros(shape)
    batch = RolloutBatch(prompts=prompts, records=[None] * shape[0], prompt_keys=list(range(shape[0])),
                         responses=responses, texts=[[""] * shape[1]] * shape[0],
                         finish_reasons=[["stop"] * shape[1]] * shape[0], rewards=z, accuracy=z, format=z,
                         advantages=torch.tensor(advantages, dtype=torch.float32),
                         zero_std=torch.zeros(shape[0], dtype=torch.bool))
    batch.micro_batches = plan_micro_batches(batch, minibatches, micro_batch_size, pad_token_id)
    return batch
