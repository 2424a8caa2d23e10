"""Vocabulary-parallel bookkeeping shared by the GKD losses (megatron's layout, no autograd here).

Logits at the response positions arrive as ``[..., V/tp]`` per rank: tensor-parallel rank r of ``group``
holds the vocabulary ids ``[r * V/tp, (r + 1) * V/tp)`` (megatron's ``VocabUtility`` ranges; the padded
vocabulary divides evenly). ``group`` None (or of size 1) means the whole vocabulary is on this rank and
no collective runs. Nothing here gathers the vocabulary: only per-token scalars, or k values per token,
cross the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def group_size(group) -> int:
    """Ranks in ``group``; 1 for None."""
    return 1 if group is None else dist.get_world_size(group)


def shard_start(local_vocab: int, group) -> int:
    """First vocabulary id held by this rank."""
    return 0 if group_size(group) == 1 else dist.get_rank(group) * local_vocab


def all_reduce_(x: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce of a freshly made tensor over ``group`` (a no-op without one)."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def all_gather_last(x: Tensor, group) -> Tensor:
    """Concatenate every rank's ``x`` along the last dimension, rank order (small tensors only)."""
    n = group_size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def scaled_logits(logits: Tensor, temperature: float) -> Tensor:
    """``logits / T`` in at least float32 (float64 stays float64), detached, as a new tensor.

    The same scaling as the policy's log-probs (``Qwen25VLModel.forward`` divides by ``temperature``
    before its log-softmax), so the GKD distributions are the sampling distributions softmax(z / T).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.detach().to(dtype)
    return z / temperature if temperature != 1.0 else z


def global_max(*zs: Tensor, group) -> Tensor:
    """max_v z[..., v] over the whole vocabulary of each shard in ``zs``, stacked [len(zs), ...]: one MAX
    all-reduce. A row with no finite entry gets 0 (its softmax is then all zeros instead of NaN)."""
    m = torch.stack([z.max(dim=-1).values for z in zs])
    m = all_reduce_(m, group, dist.ReduceOp.MAX)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def log_softmax_pair(s: Tensor, t: Tensor, group) -> tuple[Tensor, Tensor]:
    """log-softmax over the vocabulary of two shards of equal shape (student, teacher) with their
    normalisers from one MAX and one SUM all-reduce (megatron's vocab-parallel cross-entropy pattern):

        ln p(v) = z(v) - M - ln sum_u exp(z(u) - M),   M = max_u z(u)   (u over all ranks' shards)
    """
    m = global_max(s, t, group=group)  # [2, ...]
    sums = torch.stack([torch.exp(s - m[0, ..., None]).sum(-1), torch.exp(t - m[1, ..., None]).sum(-1)])
    log_z = m + torch.log(all_reduce_(sums, group))
    return s - log_z[0, ..., None], t - log_z[1, ..., None]


def member_mask(ids: Tensor, start: int, local_vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where global ``ids`` [..., k] fall in this rank's shard [start, start + local_vocab).

    Returns (``mask`` bool [..., local_vocab]: True at the shard's entries listed in ids; ``inside`` bool
    [..., k]; ``local`` int64 [..., k]: the shard column of each id, ``local_vocab`` for ids elsewhere,
    i.e. a spare column for scatters into a ``local_vocab + 1`` wide buffer).
    """
    local = ids - start
    inside = (local >= 0) & (local < local_vocab)
    local = torch.where(inside, local, torch.full_like(local, local_vocab))
    mask = torch.zeros(*ids.shape[:-1], local_vocab + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(-1, local, True)
    return mask[..., :local_vocab], inside, local
