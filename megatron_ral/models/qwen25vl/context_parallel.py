"""Context parallelism (CP) of a training forward: which tokens a rank holds, and the collectives that join them.

Under ``context_parallel_size = C`` every sequence of a training / scoring forward is cut into ``2C`` equal chunks
and CP rank i holds chunks i and ``2C - 1 - i`` (megatron's load-balanced split, see
:func:`~megatron_ral.models.qwen25vl.attention_layout.cp_indices`). A sequence whose length is not a multiple
of ``2C`` is right-padded to one (:func:`cp_padded_length`); the padding tokens come after every real token, so
causal attention never lets a real token see them.

    share = CPShare.current(length)            # this rank's tokens of a stream of `length` tokens
    x_local = share.split(x, dim=0)            # the rank's rows of a tensor over the whole stream
    local = share.local_index(global_index)    # where a global token sits in the rank's share (-1: elsewhere)
    y = reduce_from_cp(y_partial, share.group) # sum over the CP group; gradient passed through unchanged

Loss convention. Each CP rank computes the per-token terms of the tokens it holds; :func:`reduce_from_cp`
sums them over the group, so every CP rank holds the whole per-token tensor (and the whole loss). The backward
of that sum is the identity: each rank back-propagates the gradient of the entries it computed through its own
graph (the others are constants there), so summed over the group the gradient is the unsplit one. With
megatron's schedule (which multiplies the loss by C) and DDP (which averages gradients over DP x C), this gives
the gradient of the unsplit loss with no further factor.

Generation never splits: it runs each CP rank as an independent replica (see ``rl.rollout``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ral.models.qwen25vl.attention_layout import cp_indices


def cp_padded_length(length: int, cp_size: int) -> int:
    """The smallest multiple of ``2 * cp_size`` that is >= ``length`` (``length`` itself at CP = 1)."""
    if cp_size <= 1:
        return int(length)
    m = 2 * cp_size
    return -(-int(length) // m) * m


def context_parallel_state() -> tuple[int, int, object]:
    """(size, rank, group) of megatron's context-parallel group; (1, 0, None) when megatron is not set up."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0, None
    size = parallel_state.get_context_parallel_world_size()
    if size == 1:
        return 1, 0, None
    return size, parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_group()


@dataclass(frozen=True)
class CPShare:
    """The tokens of a stream of ``length`` tokens (a multiple of ``2 * size``) held by CP rank ``rank``."""

    size: int
    rank: int
    group: object
    length: int

    @classmethod
    def current(cls, length: int) -> "CPShare":
        size, rank, group = context_parallel_state()
        return cls(size, rank, group, int(length))

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def local_length(self) -> int:
        return self.length // self.size

    def indices(self, device: torch.device | str = "cpu") -> Tensor:
        """int64 [L / C]: the global token index of each local position."""
        if not self.active:
            return torch.arange(self.length, device=device)
        return cp_indices(self.length, self.size, self.rank).to(device)

    def split(self, x: Tensor, dim: int) -> Tensor:
        """This rank's share of ``x`` whose dimension ``dim`` runs over the whole stream."""
        if not self.active:
            return x
        if x.shape[dim] != self.length:
            raise ValueError(f"dimension {dim} of the tensor has {x.shape[dim]} entries, the stream {self.length}")
        return x.index_select(dim, self.indices(x.device))

    def local_index(self, global_index: Tensor) -> Tensor:
        """Same shape as ``global_index``: the local position of each global token index, -1 where another
        CP rank holds it."""
        if not self.active:
            return global_index.clone()
        inverse = torch.full((self.length,), -1, dtype=torch.long, device=global_index.device)
        inverse[self.indices(global_index.device)] = torch.arange(self.local_length, device=global_index.device)
        return inverse[global_index.long()]


# ---------------------------------------------------------------------------- collectives
class _ReduceFromCP(torch.autograd.Function):
    """Sum over the CP group; the backward passes the gradient through unchanged (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def reduce_from_cp(x: Tensor, group) -> Tensor:
    """``sum over the CP group of x`` on every rank, differentiable: each rank's gradient is the gradient of its
    own entries (identity backward). ``group`` None or of size 1: ``x`` itself."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _ReduceFromCP.apply(x, group)


class _AllReduceCP(torch.autograd.Function):
    """Sum over the CP group, each rank's gradient the sum of every rank's gradient (all-reduce both ways)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def share_over_cp(x: Tensor, group) -> Tensor:
    """``sum over the CP group of x`` on every rank when the ranks hold disjoint parts of one tensor (zeros
    elsewhere) that every rank then uses: the gradient of each part is summed over the ranks that used it and
    reaches its owner. ``group`` None or of size 1: ``x``."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceCP.apply(x, group)


def _load_balanced_order(parts: list[Tensor]) -> Tensor:
    """Global order of the per-rank shares [chunk i, chunk 2C-1-i] (concatenated along dim 0)."""
    halves = [p.chunk(2, dim=0) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=0)


class _GatherSequence(torch.autograd.Function):
    """All-gather a CP-split tensor (sequence on dim 0) into global token order; backward reduce-scatter."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        size = dist.get_world_size(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        ctx.group, ctx.size, ctx.rank = group, size, dist.get_rank(group)
        return _load_balanced_order(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        chunks = grad.contiguous().chunk(2 * ctx.size, dim=0)
        shares = [torch.cat([chunks[r], chunks[2 * ctx.size - 1 - r]], dim=0).contiguous() for r in range(ctx.size)]
        out = torch.empty_like(shares[ctx.rank])
        dist.reduce_scatter(out, shares, group=ctx.group)
        return out, None


def gather_sequence_cp(x: Tensor, group) -> Tensor:
    """The whole stream of a tensor split over ``group`` by the load-balanced scheme (dim 0 = sequence),
    differentiable: the gradient of every token goes back, summed over the group, to the rank holding it."""
    return _GatherSequence.apply(x, group)


def all_gather_rows(x: Tensor, sizes: list[int], group) -> Tensor:
    """Concatenate along dim 0 the ``x`` of every rank of ``group`` (rank r holds ``sizes[r]`` rows; the other
    dimensions agree), without gradient. Every rank must know ``sizes``."""
    size = dist.get_world_size(group)
    if len(sizes) != size:
        raise ValueError(f"{len(sizes)} sizes for a group of {size}")
    rank = dist.get_rank(group)
    if x.shape[0] != sizes[rank]:
        raise ValueError(f"this rank holds {x.shape[0]} rows, the sizes say {sizes[rank]}")
    width = max(max(sizes), 1)
    buf = x.new_zeros((width,) + tuple(x.shape[1:]))
    buf[: x.shape[0]] = x
    parts = [torch.empty_like(buf) for _ in range(size)]
    dist.all_gather(parts, buf.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


@contextlib.contextmanager
def unsplit_rotary(rotary):
    """megatron's rotary embedding (``MultimodalRotaryEmbedding``) without its per-CP-rank slicing inside the
    block: the table of every position given (generation runs each CP rank as a whole replica)."""
    saved = getattr(rotary, "cp_group", None)
    rotary.cp_group = None
    try:
        yield rotary
    finally:
        rotary.cp_group = saved

