"""Which rollout groups a step trains on: zero-variance groups left out, and (dynamic sampling) refilled.

A group whose G rewards are all equal has A = 0 for every response: no GRPO signal. With
``algorithm.drop_zero_std_groups`` such groups are left out of the update; with
``algorithm.dynamic_sampling`` (DAPO) the step also draws further rounds of prompts until it holds
``target`` (= training.prompts_per_step) informative groups or has drawn ``max_sampling_rounds`` rounds.

Layout-free by construction:

- draw keys: prompt j of round k on data-parallel rank r has key ``k * P + j * dp + r`` (P prompts per
  round, the loader's round-robin), a global index that does not depend on the DP size; the sampling seeds
  use it, so a prompt's responses are the same at any layout;
- selection: every rank gathers the (key, zero-variance) flags of all ranks and keeps the first ``target``
  informative groups in key order (the same choice everywhere);
- resharding: kept group i (in key order) goes to rank ``i % dp`` (the loader's own spread) and gets the
  key i, so the micro-batch plan, the mini-batches and the attention diagnostics see the batch of the DP=1
  run; groups move point to point (``rl.group_exchange``).

A rank left without a kept group (fewer kept groups than ranks) keeps one of its own as a weight-0
placeholder, so that it still runs each optimizer step's schedule and gradient reduction.

    plan = GroupFilter.from_config(cfg.algorithm)
    out = draw_groups(plan, target, generate_round, dp_rank, dp_size, dp_group)   # StepGroups
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

from megatron_ral.rl.batch import RolloutBatch
from megatron_ral.rl.group_exchange import RolloutGroup, batch_of, exchange_groups, groups_of


@dataclass(frozen=True)
class GroupFilter:
    """drop_zero_std: leave zero-variance groups out of the update; max_rounds: rollout rounds per step at
    most, the first included (1 = no refill)."""

    drop_zero_std: bool = False
    max_rounds: int = 1

    @classmethod
    def from_config(cls, algorithm) -> "GroupFilter":
        if algorithm.dynamic_sampling:
            return cls(drop_zero_std=True, max_rounds=int(algorithm.max_sampling_rounds))
        return cls(drop_zero_std=bool(algorithm.drop_zero_std_groups), max_rounds=1)

    def another_round(self, informative: int, target: int, rounds: int) -> bool:
        return self.drop_zero_std and informative < target and rounds < self.max_rounds


@dataclass(frozen=True)
class DrawnGroup:
    """What every rank knows about a drawn group: its draw key, the rank that holds it, and whether its
    rewards were all equal."""

    key: int
    owner: int
    zero_std: bool


def round_keys(local_keys: list[int], round_index: int, prompts_per_round: int) -> list[int]:
    """Draw keys of a round's prompts from their keys within the round (``rl.rollout.global_prompt_keys``)."""
    return [k + round_index * prompts_per_round for k in local_keys]


def select_groups(drawn: list[DrawnGroup], target: int, drop_zero_std: bool) -> list[DrawnGroup]:
    """The groups the step trains on, in key order: the first ``target`` groups, informative ones only when
    ``drop_zero_std``."""
    ordered = sorted(drawn, key=lambda d: d.key)
    if drop_zero_std:
        ordered = [d for d in ordered if not d.zero_std]
    return ordered[:target]


def destination(position: int, dp_size: int) -> int:
    """The data-parallel rank that trains on kept group ``position`` (the loader's round-robin)."""
    return position % dp_size


@dataclass
class StepGroups:
    """This rank's share of the kept groups (``batch``) and the step's counts, the same on every rank."""

    batch: RolloutBatch
    groups_drawn: int
    groups_kept: int
    rounds: int

    @property
    def groups_dropped(self) -> int:
        return self.groups_drawn - self.groups_kept


def _gather(items: list, dp_size: int, group) -> list[list]:
    if dp_size == 1:
        return [items]
    out: list = [None] * dp_size
    dist.all_gather_object(out, items, group=group)
    return out


def draw_groups(plan: GroupFilter, target: int, generate_round: Callable[[int], RolloutBatch], dp_rank: int,
                dp_size: int, dp_group=None) -> StepGroups:
    """Draw rounds (``generate_round(k)``: this rank's rollout batch of round k, prompt keys = draw keys)
    until ``plan`` is satisfied, keep the selected groups and reshard them. Collective over ``dp_group``."""
    drawn: list[DrawnGroup] = []
    held: dict[int, RolloutGroup] = {}      # this rank's groups that may still be kept
    spare: RolloutGroup | None = None        # a group of this rank, for the placeholder
    rounds = 0
    while True:
        batch = generate_round(rounds)
        rounds += 1
        local = groups_of(batch)
        for owner, flags in enumerate(_gather([(g.key, g.zero_std) for g in local], dp_size, dp_group)):
            drawn.extend(DrawnGroup(key, owner, zero) for key, zero in flags)
        if spare is None:
            spare = local[0]
        held.update({g.key: g for g in local if not (plan.drop_zero_std and g.zero_std)})
        informative = sum(not d.zero_std for d in drawn)
        if not plan.another_round(informative, target, rounds):
            break

    kept = select_groups(drawn, target, plan.drop_zero_std)
    outgoing: dict[int, list[RolloutGroup]] = {}
    moves: list[tuple[int, int]] = []
    mine: list[tuple[int, int]] = []         # (position, key) of the groups this rank trains on
    for i, d in enumerate(kept):
        dst = destination(i, dp_size)
        if dst == dp_rank:
            mine.append((i, d.key))
        if d.owner != dst:
            if (d.owner, dst) not in moves:
                moves.append((d.owner, dst))
            if d.owner == dp_rank:
                outgoing.setdefault(dst, []).append(held[d.key])
    moves.sort()
    received = exchange_groups(outgoing, moves, dp_rank, dp_group) if moves else {}
    arrived = {g.key: g for groups in received.values() for g in groups}
    groups = [held[key] if key in held else arrived[key] for _, key in mine]
    positions = [i for i, _ in mine]
    if not groups:
        groups, positions = [spare.left_out()], [target]   # a key outside [0, target): no diagnostics either
    return StepGroups(batch=batch_of(groups, positions), groups_drawn=len(drawn), groups_kept=len(kept),
                      rounds=rounds)
