"""The vision tower's work cut into context-parallel shares (models.qwen25vl.vision.split_vision_work): every
temporal step of every image/video in exactly one share, in processor order, each share one contiguous run,
and the shares' patch counts within one step's cost of an even split."""

import pytest
import torch

from megatron_ral.models.qwen25vl.vision import split_vision_work


@pytest.mark.parametrize("grids,parts", [
    ([[6, 4, 8], [2, 8, 4]], 2),
    ([[1, 8, 8], [1, 4, 4], [1, 4, 8]], 2),
    ([[64, 16, 16]], 4),
    ([[3, 10, 14], [1, 36, 20], [5, 6, 6]], 3),
    ([[1, 4, 4]], 2),        # fewer steps than parts: a share stays empty
])
def test_shares_cover_every_step_once_in_order_and_balance(grids, parts):
    grid = torch.tensor(grids)
    shares = split_vision_work(grid, parts)
    assert len(shares) == parts
    steps = [(item, t) for share in shares for item, t0, t1 in share for t in range(t0, t1)]
    assert steps == [(i, t) for i, (tt, _, _) in enumerate(grids) for t in range(tt)]
    cost = [sum((t1 - t0) * grids[i][1] * grids[i][2] for i, t0, t1 in share) for share in shares]
    total, step_max = sum(cost), max(h * w for _, h, w in grids)
    assert max(abs(c - total / parts) for c in cost) <= step_max
    for share in shares:  # one piece per item, pieces of consecutive items
        items = [i for i, _, _ in share]
        assert items == sorted(set(items))
