"""Eager reference of the attention policy: materialises every head's full probability matrix.

Same definition as :func:`megatron_ral.attention.policy.attention_policy` (see its module docstring),
computed the plain way with autograd: logits [B, H, R, T], masked softmax, head mean, own position
dropped, renormalised. Memory O(H x R x T); used as the numeric reference in tests and as the
baseline in ``tools/bench/attention_capture.py``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ral.attention.layout import RowLayout, sample_keys


class _SumOverGroup(torch.autograd.Function):
    """All-reduce sum whose backward is the identity (the loss downstream is replicated per rank)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def attention_policy_reference(
    q: Tensor,
    k: Tensor,
    layout: RowLayout,
    softmax_scale: float | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """p [B, R, T] computed by materialising all heads' probabilities (q [R,B,H,d], k [T,B,Hkv,d], or the
    stream's [L,1,Hkv,d] for a packed layout)."""
    if layout.stream_index is not None:
        layout.validate(k.shape[0])
        k, layout = sample_keys(k, layout)
    num_rows, batch, hq, d = q.shape
    num_keys, _, hkv, _ = k.shape
    n_rep = hq // hkv
    cdt = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    layout = layout.to(q.device)

    qf = q.to(cdt).permute(1, 2, 0, 3)  # [B, H, R, d]
    kf = k.to(cdt).permute(1, 2, 0, 3).repeat_interleave(n_rep, dim=1)  # [B, H, T, d]
    logits = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, H, R, T]

    keys = torch.arange(num_keys, device=q.device)
    pos = layout.row_index.long()  # [B, R]
    support = keys.view(1, 1, -1) <= pos.unsqueeze(-1)
    if layout.key_valid is not None:
        support = support & layout.key_valid.unsqueeze(1)
    if layout.segment_ids is not None:
        row_seg = torch.gather(layout.segment_ids, 1, pos.clamp(0, num_keys - 1))
        support = support & (layout.segment_ids.unsqueeze(1) == row_seg.unsqueeze(-1))
    if layout.row_valid is not None:
        support = support & layout.row_valid.unsqueeze(-1)
    before = support & (keys.view(1, 1, -1) < pos.unsqueeze(-1))

    logits = logits.masked_fill(~support.unsqueeze(1), torch.finfo(cdt).min)
    probs = torch.softmax(logits, dim=-1) * support.unsqueeze(1)
    head_sum = probs.sum(dim=1)  # [B, R, T]
    world = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    if world > 1:
        head_sum = _SumOverGroup.apply(head_sum, tp_group)
    mean = head_sum / (hq * world)
    kept = mean * before
    z = kept.sum(dim=-1, keepdim=True)
    return kept / torch.where(z > 0, z, torch.ones_like(z))
