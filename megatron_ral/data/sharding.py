"""Per-epoch record order and its partition across data-parallel ranks and loader workers."""

from __future__ import annotations

import numpy as np


def epoch_order(num_records: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """Global order of record indices for `epoch`: the same on every rank (seeded by (seed, epoch))."""
    if not shuffle:
        return np.arange(num_records, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_records).astype(np.int64)


def shard(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Records of `rank`: order[rank::world_size]. The shards partition the epoch exactly (sizes
    differ by at most one); nothing is dropped or repeated."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return order[rank::world_size]
