"""Which keys each captured query row may see: row positions, padding and packed-sequence segments.

A batch of captured rows is described by a :class:`RowLayout`. Every tensor is indexed by batch ``b``
in the same order as the ``B`` dimension of Q and K. Positions are *indices into the key sequence*
(0 .. T-1 of the K tensor handed to the capture), not rotary/M-RoPE position ids.

Row r of sample b (query token at key index ``t = row_index[b, r]``) attends, inside the softmax, to
the keys ``i`` with

    i <= t  and  key_valid[b, i]  and  segment_ids[b, i] == segment_ids[b, t]

and its attention policy is then restricted to the same keys with ``i < t`` (own position dropped).

Packed streams (``stream_index`` set). A packed training stream (``models.qwen25vl.attention_layout``)
holds several samples in one batch entry, a shared-prompt group's prompt once for all its responses. Its
rows are still described per sample, in the padded coordinates above (key i of sample b = token i of that
sample alone), so the rows p [B, R, T] are those of the padded batch; ``stream_index[b, i]`` says where key
i of sample b sits in the stream, whose Q and K ([L, 1, H, d]) the capture receives.
:func:`sample_keys` gathers each sample's keys from the stream (a group's prompt keys once per response,
their gradients summed back) and :func:`gather_rows` its query rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RowLayout:
    """Row positions and masks of a capture.

    Attributes:
        row_index: int64 [B, R]; key index of each captured query row.
        row_valid: bool [B, R] or None (all rows real). Invalid rows (padding of shorter responses)
            produce all-zero policy rows and receive no gradient; their ``row_index`` may be anything in
            range.
        key_valid: bool [B, T] or None (all keys real). False for padding tokens.
        segment_ids: int64 [B, T] or None (one sequence per batch entry). Packed sequences: tokens of
            the same sample share an id; a row sees only keys of its own segment. Build it from
            cu_seqlens with :func:`segment_ids_from_cu_seqlens`.
        stream_index: int64 [B, T] or None. When set, the captured Q and K are one packed stream
            [L, 1, H, d] and key i of sample b is stream token ``stream_index[b, i]`` (any in-range value
            where ``key_valid`` is False); the other fields keep the per-sample coordinates.
    """

    row_index: Tensor
    row_valid: Tensor | None = None
    key_valid: Tensor | None = None
    segment_ids: Tensor | None = None
    stream_index: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.row_index.shape[0]

    @property
    def captured_batch_size(self) -> int:
        """Batch entries of the captured Q/K: 1 for a packed stream, else B."""
        return 1 if self.stream_index is not None else self.batch_size

    @property
    def num_sample_keys(self) -> int | None:
        """T of a packed stream's samples (None: the keys are the captured K's own positions)."""
        return None if self.stream_index is None else int(self.stream_index.shape[1])

    def unpacked(self) -> "RowLayout":
        """The same rows over per-sample keys (``stream_index`` dropped): the layout of :func:`sample_keys`'s K."""
        return RowLayout(self.row_index, self.row_valid, self.key_valid, self.segment_ids)

    @property
    def num_rows(self) -> int:
        return self.row_index.shape[1]

    def validate(self, num_keys: int) -> None:
        """Raise ValueError with a clear message if shapes or values do not fit ``num_keys`` keys (the
        captured K's length: the stream's for a packed layout)."""
        if self.stream_index is not None:
            si = self.stream_index
            if si.dim() != 2 or si.shape[0] != self.row_index.shape[0]:
                raise ValueError(f"stream_index must be [B, T] with B = {self.row_index.shape[0]}, "
                                 f"got {tuple(si.shape)}")
            if si.numel() and (int(si.min()) < 0 or int(si.max()) >= num_keys):
                raise ValueError(f"stream_index values must lie in [0, {num_keys}) (the stream's length); got "
                                 f"[{int(si.min())}, {int(si.max())}]")
            num_keys = int(si.shape[1])
        if self.row_index.dim() != 2:
            raise ValueError(f"row_index must be [B, R], got shape {tuple(self.row_index.shape)}")
        if self.row_index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"row_index must be an integer tensor, got {self.row_index.dtype}")
        b, r = self.row_index.shape
        if self.row_valid is not None and tuple(self.row_valid.shape) != (b, r):
            raise ValueError(f"row_valid must be [B, R] = {(b, r)}, got {tuple(self.row_valid.shape)}")
        for name in ("key_valid", "segment_ids"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (b, num_keys):
                raise ValueError(f"{name} must be [B, T] = {(b, num_keys)}, got {tuple(t.shape)}")
        if r > 0:
            idx = self.row_index if self.row_valid is None else self.row_index[self.row_valid]
            if idx.numel():
                lo, hi = torch.stack([idx.min(), idx.max()]).tolist()  # one read
                if lo < 0 or hi >= num_keys:
                    raise ValueError(f"row_index values must lie in [0, {num_keys}); got [{lo}, {hi}]")

    def to(self, device: torch.device | str) -> "RowLayout":
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return RowLayout(mv(self.row_index), mv(self.row_valid), mv(self.key_valid), mv(self.segment_ids),
                         mv(self.stream_index))

    def policy_key_mask(self, num_keys: int) -> Tensor:
        """bool [B, R, T]: keys that carry policy mass for each row (allowed, before the row, row valid)."""
        b, r = self.row_index.shape
        allowed = torch.zeros(b, r, num_keys, dtype=torch.bool, device=self.row_index.device)
        for bi in range(b):
            allowed[bi] = allowed_keys(self, bi, 0, r, 0, num_keys, strict=True)
        return allowed


def allowed_keys(
    layout: RowLayout, b: int, r0: int, r1: int, k0: int, k1: int, strict: bool
) -> Tensor:
    """bool [r1-r0, k1-k0]: keys k0..k1-1 visible to rows r0..r1-1 of sample b.

    ``strict=False`` gives the softmax support (i <= t); ``strict=True`` the policy support (i < t).
    Invalid rows get an all-False row.
    """
    pos = layout.row_index[b, r0:r1].long()
    keys = torch.arange(k0, k1, device=pos.device)
    ok = keys.unsqueeze(0) < pos.unsqueeze(1) if strict else keys.unsqueeze(0) <= pos.unsqueeze(1)
    if layout.key_valid is not None:
        ok &= layout.key_valid[b, k0:k1].unsqueeze(0)
    if layout.segment_ids is not None:
        seg = layout.segment_ids[b]
        ok &= seg[k0:k1].unsqueeze(0) == seg[pos].unsqueeze(1)
    if layout.row_valid is not None:
        ok &= layout.row_valid[b, r0:r1].unsqueeze(1)
    return ok


def segment_ids_from_cu_seqlens(cu_seqlens: Tensor, total_length: int | None = None) -> Tensor:
    """int64 [T] segment id of every token of a packed stream from cumulative lengths [S+1].

    ``cu_seqlens = [0, n_0, n_0+n_1, ...]``. Tokens past ``cu_seqlens[-1]`` (tail padding, when
    ``total_length`` is larger) get id -1 and should also be marked invalid in ``key_valid``.
    """
    cu = cu_seqlens.long()
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be a non-decreasing 1-D tensor starting at 0, got {cu.tolist()}")
    total = int(cu[-1]) if total_length is None else int(total_length)
    if total < int(cu[-1]):
        raise ValueError(f"total_length {total} is shorter than cu_seqlens[-1] = {int(cu[-1])}")
    pos = torch.arange(total, device=cu.device)
    seg = torch.searchsorted(cu[1:], pos, right=True)
    seg[pos >= cu[-1]] = -1
    return seg


def response_row_layout(
    prompt_lengths: list[int], total_lengths: list[int], num_keys: int | None = None
) -> RowLayout:
    """Layout for a right-padded batch whose rows are each sample's response tokens.

    Sample b has tokens 0..total_lengths[b]-1, of which the first prompt_lengths[b] are prompt; its
    captured rows are keys prompt_lengths[b] .. total_lengths[b]-1, padded to the longest response.
    """
    if len(prompt_lengths) != len(total_lengths):
        raise ValueError("prompt_lengths and total_lengths must have the same length")
    b = len(prompt_lengths)
    t = max(total_lengths) if num_keys is None else num_keys
    r = max((n - p for p, n in zip(prompt_lengths, total_lengths)), default=0)
    row_index = torch.zeros(b, r, dtype=torch.long)
    row_valid = torch.zeros(b, r, dtype=torch.bool)
    key_valid = torch.zeros(b, t, dtype=torch.bool)
    for i, (p, n) in enumerate(zip(prompt_lengths, total_lengths)):
        if not 0 <= p <= n <= t:
            raise ValueError(f"sample {i}: need 0 <= prompt_length <= total_length <= T, got {p}, {n}, {t}")
        row_index[i, : n - p] = torch.arange(p, n)
        row_valid[i, : n - p] = True
        key_valid[i, :n] = True
    return RowLayout(row_index=row_index, row_valid=row_valid, key_valid=key_valid)


def _stream_positions(layout: RowLayout, x: Tensor, index: Tensor) -> Tensor:
    """x [L, 1, H, d] of a packed stream at per-sample positions ``index`` [B, n] -> [n, B, H, d]."""
    if x.shape[1] != 1:
        raise ValueError(f"a packed stream has one batch entry, got shape {tuple(x.shape)}")
    return x[:, 0].index_select(0, index.transpose(0, 1).reshape(-1)).view(index.shape[1], index.shape[0],
                                                                          *x.shape[2:])


def sample_keys(k: Tensor, layout: RowLayout) -> tuple[Tensor, RowLayout]:
    """(K [T, B, H_kv, d], layout over it) from captured K: for a packed stream each sample's keys gathered
    from the stream (differentiable: a key shared by several samples gets their gradients summed); otherwise
    ``k`` and ``layout`` unchanged."""
    if layout.stream_index is None:
        return k, layout
    index = layout.stream_index.to(k.device).long()
    return _stream_positions(layout, k, index), layout.unpacked()


def gather_rows(x: Tensor, layout: RowLayout) -> Tensor:
    """Select the captured rows from a full [T, B, H, d] tensor (a packed stream [L, 1, H, d] when
    ``layout.stream_index`` is set): returns [R, B, H, d] (differentiable).

    Invalid rows are gathered from their (arbitrary, in-range) ``row_index`` and masked later.
    """
    if x.dim() != 4:
        raise ValueError(f"expected [T, B, H, d], got shape {tuple(x.shape)}")
    if layout.stream_index is not None:
        si = layout.stream_index.to(x.device).long()
        rows = si.gather(1, layout.row_index.to(x.device).long().clamp(0, si.shape[1] - 1))  # [B, R]
        return _stream_positions(layout, x, rows)
    idx = layout.row_index.long().clamp(0, x.shape[0] - 1).transpose(0, 1)  # [R, B]
    idx = idx[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
    return torch.gather(x, 0, idx)
