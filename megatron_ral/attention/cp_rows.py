"""Captured rows under context parallelism: which response rows a CP rank computes, and putting them back together.

Under CP (``context_parallel_size = C``) each rank's forward holds a share of the sequence (megatron's
load-balanced split, ``models.qwen25vl.context_parallel``): its queries are the tokens of that share; the capture
all-gathers the keys, so every rank can compute any row against the whole key sequence. The response sits at
the end of a sequence, in the last of the 2C chunks, so one rank usually holds every response token. To split
the capture's work (and its [rows x keys] memory) evenly, the rows are dealt out: the Q rows of the response
tokens (R x heads x d, small) are shared over the CP group from the ranks that hold them, and CP rank c
computes rows c, c + C, c + 2C, ... of each sample: a compact ``[B, R_c, T]`` (R_c = ceil(R / C), rows past a
sample's response invalid). :class:`CPRows` records which of the batch's ``R`` rows they are; the gradient of a
row's query goes back to the rank that holds its token, that of the keys to the ranks that hold them.

Anything computed per row (a divergence, an entropy, a mass share: ``[B, R_c]``) is put back into the batch's
``[B, R]`` by :meth:`CPRows.full`, which scatters it and sums over the CP group: every CP rank then holds the
whole per-row tensor, whose gradient each rank back-propagates into the rows it computed (identity backward, as
for the per-token loss). Divergences are thus summed over the CP group exactly once per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ral.attention.layout import RowLayout, gather_rows
from megatron_ral.models.qwen25vl.context_parallel import CPShare, reduce_from_cp, share_over_cp


@dataclass
class CPRows:
    """The rows a CP rank captured: ``index[b, j]`` is the batch row (0 .. R-1) of captured row j of sample b,
    ``valid[b, j]`` whether it is one (rows past a sample's response are padding)."""

    index: Tensor
    valid: Tensor
    num_rows: int
    group: object

    def _scatter(self, x: Tensor) -> Tensor:
        b, j = self.valid.nonzero(as_tuple=True)
        out = torch.zeros(x.shape[0], self.num_rows, *x.shape[2:], dtype=x.dtype, device=x.device)
        return out.index_put((b.to(x.device), self.index[b, j].to(x.device)), x[b, j])

    def full(self, x: Tensor) -> Tensor:
        """Per-row values ``x`` [B, R_c, ...] of this rank -> [B, R, ...] of every row, summed over the CP group
        (differentiable; each rank's gradient reaches its own rows)."""
        return reduce_from_cp(self._scatter(x), self.group)

    @torch.no_grad()
    def full_rows(self, rows: Tensor) -> Tensor:
        """The captured rows [B, R_c, T] of every CP rank as the batch's [B, R, T] (no gradient; for dumps)."""
        out = self._scatter(rows)
        dist.all_reduce(out, group=self.group)
        return out


def dealt_rows(query: Tensor, layout: RowLayout, share: CPShare) -> tuple[Tensor, CPRows, RowLayout]:
    """(the query rows this CP rank computes [R_c, B, H, d], the CPRows, the compact layout) of ``layout`` (a
    layout over the global key sequence of ``share.length`` keys, or the samples of a packed stream of that
    length) from this rank's queries ``query`` [L / C, B, H, d]: see the module docstring (rows c, c + C, ...
    of each sample on CP rank c)."""
    batch, num_rows = layout.row_index.shape
    row_valid = layout.row_valid if layout.row_valid is not None else torch.ones_like(layout.row_index, dtype=torch.bool)
    if layout.stream_index is None:  # rows at key positions of each batch entry
        local = share.local_index(layout.row_index.long().clamp(0, share.length - 1))
        mine = gather_rows(query, RowLayout(row_index=local.clamp_min(0).to(query.device)))  # [R, B, H, d]
    else:  # a packed stream (one batch entry): rows of the samples at stream positions
        si = layout.stream_index.long()
        local = share.local_index(si.gather(1, layout.row_index.long().clamp(0, si.shape[1] - 1)))
        at = local.clamp_min(0).t().reshape(-1).to(query.device)
        mine = query[:, 0].index_select(0, at).view(num_rows, batch, *query.shape[2:])
    owned = (local >= 0) & row_valid.to(local.device)
    mine = torch.where(owned.t().to(query.device)[:, :, None, None], mine, torch.zeros_like(mine))
    every = share_over_cp(mine, share.group)  # each row from the rank holding its token
    width = max(-(-num_rows // share.size), 1)
    index = share.rank + share.size * torch.arange(width, device=local.device)
    valid = (index < num_rows)[None].expand(batch, -1)
    index = index.clamp(max=max(num_rows - 1, 0))[None].expand(batch, -1).contiguous()
    valid = valid & (row_valid.to(local.device).gather(1, index) if num_rows else valid)
    q_rows = gather_rows(every, RowLayout(row_index=index.to(query.device)))
    compact = RowLayout(row_index=layout.row_index.gather(1, index), row_valid=valid,
                        key_valid=layout.key_valid, segment_ids=layout.segment_ids, stream_index=layout.stream_index)
    return q_rows, CPRows(index=index, valid=valid, num_rows=num_rows, group=share.group), compact


def pad_keys(layout: RowLayout, num_keys: int) -> RowLayout:
    """``layout`` over ``num_keys`` keys: the extra keys (tail padding of a CP split) invalid."""
    def pad(t: Tensor | None, value) -> Tensor | None:
        if t is None or t.shape[1] == num_keys:
            return t
        if t.shape[1] > num_keys:
            raise ValueError(f"the layout describes {t.shape[1]} keys, the forward has {num_keys}")
        return torch.cat([t, t.new_full((t.shape[0], num_keys - t.shape[1]), value)], dim=1)

    key_valid = layout.key_valid
    if key_valid is None and layout.segment_ids is None:
        # no mask: every key up to each row is real; the tail keys come after every row, so no row sees them
        return layout
    return RowLayout(layout.row_index, layout.row_valid, pad(key_valid, False), pad(layout.segment_ids, -1))
