"""Captured rows under context parallelism: which response rows a CP rank holds, and putting them back together.

Under CP (``context_parallel_size = C``) each rank holds a share of the sequence (megatron's load-balanced split,
``models.qwen25vl.context_parallel``): its queries are the tokens of that share, its keys the whole sequence
(all-gathered). The capture therefore computes, on each CP rank, the rows of the response tokens that rank holds,
against every key: a compact ``[B, R_c, T]`` (R_c = the most rows any sample has on this rank, at least 1; the
others invalid). :class:`CPRows` records which of the batch's ``R`` rows they are.

Anything computed per row (a divergence, an entropy, a mass share: ``[B, R_c]``) is put back into the batch's
``[B, R]`` by :meth:`CPRows.full`, which scatters it and sums over the CP group: every CP rank then holds the
whole per-row tensor, whose gradient each rank back-propagates into its own rows (identity backward, as for the
per-token loss). Divergences are thus summed over the CP group exactly once per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ral.attention.layout import RowLayout
from megatron_ral.models.qwen25vl.context_parallel import CPShare, reduce_from_cp


@dataclass
class CPRows:
    """The rows a CP rank captured: ``index[b, j]`` is the batch row (0 .. R-1) of captured row j of sample b,
    ``valid[b, j]`` whether it is one (rows past a sample's count are padding)."""

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


def owned_rows(layout: RowLayout, share: CPShare) -> tuple[Tensor, CPRows, RowLayout]:
    """(local query positions [B, R_c], the CPRows, the compact layout) of this CP rank's rows of ``layout``
    (a layout over the global key sequence of ``share.length`` keys)."""
    batch, num_rows = layout.row_index.shape
    row_valid = layout.row_valid if layout.row_valid is not None else torch.ones_like(layout.row_index, dtype=torch.bool)
    local = share.local_index(layout.row_index.long().clamp(0, share.length - 1))
    owned = (local >= 0) & row_valid.to(local.device)
    counts = owned.sum(dim=1)
    width = max(int(counts.max()) if batch else 0, 1 if num_rows else 0)
    rank_key = (~owned).long() * num_rows + torch.arange(num_rows, device=owned.device)[None]  # owned rows first
    index = torch.argsort(rank_key, dim=1)[:, :width]
    valid = torch.arange(width, device=owned.device)[None] < counts[:, None]
    positions = local.gather(1, index).clamp_min(0)
    compact = RowLayout(row_index=layout.row_index.gather(1, index), row_valid=valid,
                        key_valid=layout.key_valid, segment_ids=layout.segment_ids)
    return positions, CPRows(index=index, valid=valid, num_rows=num_rows, group=share.group), compact


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
