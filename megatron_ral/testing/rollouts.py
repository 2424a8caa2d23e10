"""Rollout batches made from numbers alone (no model), for the group selection and exchange tests.

Group ``key`` gets a prompt whose tokens and pixels encode the key, G responses of key-dependent lengths,
generator log-probs, and rewards that are all equal exactly when ``zero_variance(key)``; so a test can tell,
after any selection and resharding, which drawn group ended where and whether its content travelled intact.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_ral.inference.prompts import PromptInput
from megatron_ral.rl.advantages import group_advantages
from megatron_ral.rl.batch import RolloutBatch


def group_content(key: int, group_size: int) -> dict:
    """The tensors of group ``key`` (what the batch built by :func:`synthetic_round` holds for it)."""
    prompt = torch.tensor([1000 + key, 7, 8, 9][: 2 + key % 3])
    responses = [torch.arange(1 + (key + g) % 4) + 100 * g + key for g in range(group_size)]
    logps = [-(r.float() + 1) / 1000 for r in responses]
    pixels = torch.full((4, 6), float(key))
    return {"prompt": prompt, "responses": responses, "logprobs": logps, "pixels": pixels}


def synthetic_round(keys: list[int], group_size: int, zero_variance: Callable[[int], bool]) -> RolloutBatch:
    """A rollout batch of the groups ``keys`` (one prompt each)."""
    contents = [group_content(k, group_size) for k in keys]
    rewards = torch.stack([torch.full((group_size,), 0.5) if zero_variance(k)
                           else torch.linspace(0, 1, group_size) * (1 + k % 3) for k in keys])
    adv = group_advantages(rewards)
    prompts = [PromptInput(c["prompt"], pixel_values=c["pixels"], image_grid_thw=torch.tensor([[1, 2, 2]]))
               for c in contents]
    return RolloutBatch(
        prompts=prompts, records=[{"key": k} for k in keys], prompt_keys=list(keys),
        responses=[c["responses"] for c in contents], texts=[[f"{k}/{g}" for g in range(group_size)] for k in keys],
        finish_reasons=[["stop"] * group_size for _ in keys], rewards=rewards, accuracy=rewards.clone(),
        format=torch.ones_like(rewards), advantages=adv.advantages, zero_std=adv.zero_std,
        rollout_logprobs=[c["logprobs"] for c in contents])
