"""Group-normalised GRPO advantages (sequence level)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GroupAdvantages:
    """advantages [P, G] (one value per response, shared by its tokens) and zero_std [P] (groups whose G
    rewards are all equal: their advantages are 0 and they carry no policy gradient)."""

    advantages: Tensor
    zero_std: Tensor

    @property
    def num_zero_std(self) -> int:
        return int(self.zero_std.sum())


def group_advantages(rewards: Tensor, eps: float = 1e-6) -> GroupAdvantages:
    """A_{i,j} = (r_{i,j} - mean_j r_{i,.}) / (std_j r_{i,.} + eps) for rewards [P, G].

    std is the unbiased (G - 1) standard deviation, as in the GRPO paper, TRL and verl. A group with
    all-equal rewards gets A = 0 exactly (not 0 / eps noise).
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, G >= 2], got shape {tuple(rewards.shape)}")
    r = rewards.to(torch.float64)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=True, keepdim=True)
    zero = (r == r[:, :1]).all(dim=1)
    adv = (r - mean) / (std + eps)
    adv = torch.where(zero[:, None], torch.zeros_like(adv), adv)
    return GroupAdvantages(advantages=adv.to(torch.float32), zero_std=zero)
