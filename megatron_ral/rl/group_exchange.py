"""Rollout groups as units that can change data-parallel rank.

A :class:`RolloutGroup` is one prompt with its G responses and everything the step computed about them
(rewards, advantages, the generator's log-probs). :func:`groups_of` splits a :class:`RolloutBatch` into
groups, :func:`batch_of` joins groups back, and :func:`exchange_groups` moves groups between the ranks of a
data-parallel group point to point: every group travels at most once, from the rank that generated it to
the rank that trains on it (prompt tensors, pixels included, and responses; no all-gather of the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ral.rl.batch import RolloutBatch


@dataclass
class RolloutGroup:
    """Prompt ``key`` of a step (its draw key; see ``rl.dynamic_sampling``), its G responses and their scores.
    rewards / accuracy / format / advantages: [G]."""

    key: int
    prompt: object                     # PromptInput
    record: object
    responses: list[Tensor]
    texts: list[str]
    finish_reasons: list[str]
    rewards: Tensor
    accuracy: Tensor
    format: Tensor
    advantages: Tensor
    zero_std: bool
    rollout_logprobs: list[Tensor]

    def left_out(self) -> "RolloutGroup":
        """The same group marked as carrying no update (A = 0, zero_std): kept only so that a rank has a
        sequence to run through each optimizer step (the micro-batch planner gives it weight 0)."""
        return replace(self, advantages=torch.zeros_like(self.advantages), zero_std=True)


def groups_of(batch: RolloutBatch) -> list[RolloutGroup]:
    logps = batch.rollout_logprobs or [[torch.zeros(r.numel()) for r in row] for row in batch.responses]
    return [RolloutGroup(key=int(batch.prompt_keys[p]), prompt=batch.prompts[p], record=batch.records[p],
                         responses=list(batch.responses[p]), texts=list(batch.texts[p]),
                         finish_reasons=list(batch.finish_reasons[p]), rewards=batch.rewards[p].clone(),
                         accuracy=batch.accuracy[p].clone(), format=batch.format[p].clone(),
                         advantages=batch.advantages[p].clone(), zero_std=bool(batch.zero_std[p]),
                         rollout_logprobs=list(logps[p]))
            for p in range(batch.num_prompts)]


def batch_of(groups: list[RolloutGroup], keys: list[int]) -> RolloutBatch:
    """A rollout batch of ``groups`` in this order, with ``keys`` as their prompt keys."""
    if not groups or len(keys) != len(groups):
        raise ValueError(f"{len(groups)} groups with {len(keys)} keys (a batch needs at least one group)")

    def stack(name):
        return torch.stack([getattr(g, name) for g in groups])

    return RolloutBatch(
        prompts=[g.prompt for g in groups], records=[g.record for g in groups], prompt_keys=list(keys),
        responses=[g.responses for g in groups], texts=[g.texts for g in groups],
        finish_reasons=[g.finish_reasons for g in groups], rewards=stack("rewards"), accuracy=stack("accuracy"),
        format=stack("format"), advantages=stack("advantages"),
        zero_std=torch.tensor([g.zero_std for g in groups], dtype=torch.bool),
        generated_tokens=sum(int(r.numel()) for g in groups for r in g.responses),
        rollout_logprobs=[g.rollout_logprobs for g in groups],
    )


def exchange_groups(outgoing: dict[int, list[RolloutGroup]], moves: list[tuple[int, int]], rank: int,
                    group=None) -> dict[int, list[RolloutGroup]]:
    """Send ``outgoing[dst]`` to each destination and receive what others send here.

    ``moves``: the (source, destination) pairs (ranks within ``group``) that have groups to move, the same
    list in the same order on every rank of ``group``; pairs are served one at a time in that order, so the
    blocking sends and receives cannot wait on each other in a cycle. Returns {source: groups received}."""
    received: dict[int, list[RolloutGroup]] = {}
    for src, dst in moves:
        if src == dst:
            raise ValueError(f"a move from rank {src} to itself")
        if rank == src:
            dist.send_object_list([outgoing[dst]], group=group, group_dst=dst)
        elif rank == dst:
            box: list = [None]
            dist.recv_object_list(box, group=group, group_src=src)
            received[src] = box[0]
    return received
