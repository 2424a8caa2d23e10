"""Rollouts: G sampled responses per prompt with the current weights, scored and group-normalised.

    batch = generate_rollouts(model, prompt_batch, settings, step=step)   # RolloutBatch, on every rank

Every rank of a model-parallel group generates the same tokens (the last stage samples and broadcasts);
each prompt's samples are seeded from (run seed, step, the prompt's index in the global batch, sample
index), so they do not depend on the tensor/pipeline/data/context-parallel layout.

Context parallelism: the weights are replicated over the CP group and generation does not split sequences,
so the C ranks of a CP group are C independent generators: CP rank c generates the prompts c, c + C, ...
of the group's batch (with the KV-cache path as usual) and the responses are all-gathered, so every CP
rank ends up with the whole rollout batch (the training passes then split each sequence over the group). The image/video placeholder
ids are never sampled (a response is fed back with the prompt's vision features, so a placeholder in it
would have no feature).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_ral.data.collate import Batch
from megatron_ral.inference.generate import GenerationStats, generate
from megatron_ral.inference.prompts import PromptInput, split_batch
from megatron_ral.inference.sampling import row_seed
from megatron_ral.rl.advantages import group_advantages
from megatron_ral.rl.batch import RolloutBatch
from megatron_ral.rl.rewards import load_reward_function, score  # noqa: F401 - re-exported


@dataclass(frozen=True)
class RolloutSettings:
    """How rollouts are sampled and scored (``reward_function``: see :func:`load_reward_function`)."""

    generation: object                 # GenerationConfig
    group_size: int
    seed: int
    template: str = "think"
    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    adv_eps: float = 1e-6
    reward_function: Callable | None = None


def _custom_score(fn: Callable, text: str, record, template: str) -> tuple[float, float, float]:
    out = fn(text, record, template)
    if isinstance(out, (int, float)):
        return float(out), float(out), 0.0
    return float(out.total), float(out.accuracy), float(out.format)


def prompts_of(batch: Batch, image_token_id: int, video_token_id: int, merge_size: int = 2) -> list[PromptInput]:
    """One PromptInput per row of a loader batch (padding removed, vision inputs split per row)."""
    return split_batch(
        batch.input_ids, batch.attention_mask, image_token_id=image_token_id, video_token_id=video_token_id,
        spatial_merge_size=merge_size, pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
        pixel_values_videos=batch.pixel_values_videos, video_grid_thw=batch.video_grid_thw,
        second_per_grid_ts=batch.second_per_grid_ts,
    )


def global_prompt_keys(num_local: int, dp_rank: int, dp_size: int) -> list[int]:
    """Index of each local prompt in the step's global batch: the loader gives rank r the global
    positions r, r + dp, r + 2 dp, ... (``data.sharding``)."""
    return [j * dp_size + dp_rank for j in range(num_local)]


def decode_response(tokenizer, token_ids: torch.Tensor, stop_ids: set[int]) -> str:
    """Response text for the reward: the stop token (if any) removed, special tokens skipped."""
    ids = token_ids.tolist()
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


def score_group(texts: list[list[str]], records: list, settings: RolloutSettings):
    """rewards, accuracy, format [P, G] of the decoded responses."""
    shape = (len(texts), settings.group_size)
    out = {k: torch.zeros(shape) for k in ("total", "accuracy", "format")}
    for p, (row, record) in enumerate(zip(texts, records)):
        for g, text in enumerate(row):
            if settings.reward_function is not None:
                values = _custom_score(settings.reward_function, text, record, settings.template)
            else:
                s = score(text, record, settings.template, settings.accuracy_weight, settings.format_weight)
                values = (s.total, s.accuracy, s.format)
            out["total"][p, g], out["accuracy"][p, g], out["format"][p, g] = values
    return out


def _generate_shared(model, prompts: list[PromptInput], prompt_keys: list[int], settings: RolloutSettings, step: int,
                     stop_token_ids: list[int], suppress_token_ids: list[int], stats: GenerationStats,
                     cp_group) -> list[list]:
    """Responses [prompt][sample] of every prompt; under a CP group of C ranks this rank generates prompts
    c, c + C, ... and the responses of all are all-gathered over the group."""
    import torch.distributed as dist

    size = dist.get_world_size(cp_group) if cp_group is not None else 1
    rank = dist.get_rank(cp_group) if size > 1 else 0
    mine = list(range(rank, len(prompts), size))
    local = []
    if mine:
        local = generate(
            model, [prompts[i] for i in mine], settings.generation, num_samples=settings.group_size,
            seed=row_seed(settings.seed, step), stop_token_ids=stop_token_ids, suppress_token_ids=suppress_token_ids,
            stats=stats, prompt_keys=[prompt_keys[i] for i in mine],
        )
    if size == 1:
        return local
    gathered: list = [None] * size
    dist.all_gather_object(gathered, [[_host(r) for r in row] for row in local], group=cp_group)
    responses: list = [None] * len(prompts)
    for r, rows in enumerate(gathered):
        for i, row in zip(range(r, len(prompts), size), rows):
            responses[i] = row
    return responses


def _host(response):
    """A response with its tensors in host memory (for the gather over the CP group)."""
    import dataclasses

    return dataclasses.replace(response, token_ids=response.token_ids.cpu(), logprobs=response.logprobs.cpu())


def generate_rollouts(model, prompts: list[PromptInput], records: list, prompt_keys: list[int], tokenizer,
                      settings: RolloutSettings, step: int, stop_token_ids: list[int],
                      suppress_token_ids: list[int], cp_group=None) -> RolloutBatch:
    """Sample G responses per prompt, decode and score them, compute group advantages. ``cp_group``: the
    context-parallel group, whose ranks share the prompts out between them (see the module docstring)."""
    stats = GenerationStats()
    t0 = time.perf_counter()
    responses = _generate_shared(model, prompts, prompt_keys, settings, step, stop_token_ids, suppress_token_ids,
                                 stats, cp_group)
    seconds = time.perf_counter() - t0
    stop = set(int(i) for i in stop_token_ids)
    texts = [[decode_response(tokenizer, r.token_ids, stop) for r in row] for row in responses]
    scores = score_group(texts, records, settings)
    adv = group_advantages(scores["total"], settings.adv_eps)
    return RolloutBatch(
        prompts=prompts, records=records, prompt_keys=list(prompt_keys),
        responses=[[r.token_ids for r in row] for row in responses], texts=texts,
        finish_reasons=[[r.finish_reason for r in row] for row in responses],
        rewards=scores["total"], accuracy=scores["accuracy"], format=scores["format"],
        advantages=adv.advantages, zero_std=adv.zero_std,
        generation_seconds=seconds, generated_tokens=sum(r.length for row in responses for r in row),
        rollout_logprobs=[[r.logprobs for r in row] for row in responses],
    )
