"""Attention-policy rows from post-RoPE Q and K, with a memory-bounded custom backward.

For query row r at key index t of sample b, with H the total number of query heads (all TP ranks),

    alpha_h[t, i] = softmax_i( scale * q_h[t] . k_{g(h)}[i] + mask[t, i] )       (mask: i <= t, same
                                                                                    segment, key valid)
    abar[t, i]    = (1/H) sum_h alpha_h[t, i]
    p[t, i]       = abar[t, i] / sum_{j < t} abar[t, j]     for allowed i < t, else 0

(paper Eq. 2: the head mean comes first, then the own position is dropped and the row renormalised).
g(h) = h // (H_local / H_kv_local) is the KV head shared by query group of head h (GQA).

Tensor parallel: each rank holds H/TP query heads and H_kv/TP KV heads. It sums its local heads'
probabilities, all-reduces the sum over the TP group, and normalises; the factor 1/H cancels in the
renormalisation. The loss computed from p is replicated on every TP rank (Megatron convention), so the
gradient dp is the same on all ranks and the backward of the all-reduce is the identity: each rank
back-propagates the full dL/d(sum) into its own heads only.

Memory. Forward keeps the output p [B, R, T] (compute dtype) plus per-head log-sum-exp [B, H_local, R];
backward recomputes each head's probabilities chunk by chunk:

    dS[t, i]    = mask_{i<t} (dp[t, i] - sum_j dp[t, j] p[t, j]) / Z_t,   Z_t = sum_{j<t} S[t, j]
    dlogit_h    = alpha_h * (dS - rowsum(dS * alpha_h))          (softmax backward, per head)
    dq_h        = scale * dlogit_h @ k_g,    dk_g += scale * dlogit_h^T @ q_h

Nothing of size H x R x T or T x T is ever held; the workspace is a [heads_per_chunk, rows, T] score
buffer and a few [rows, T] buffers, sized by ``ChunkConfig.workspace_bytes``.

Selective recompute: megatron's ``recompute_granularity="selective"`` (core_attn) runs core attention
under ``torch.no_grad`` and replays it in backward. Calling the capture from inside that region yields
rows without a graph, so the attention loss would silently get no gradient. The capture must run
outside the recomputed region (on the Q and K the layer hands to core attention, before the
checkpointed call) or the last layer must not use selective core-attention recompute. Pass
``require_grad=True`` to turn the silent failure into an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from megatron_ral.attention.layout import RowLayout, allowed_keys, sample_keys


@dataclass(frozen=True)
class ChunkConfig:
    """Chunking of the capture.

    Attributes:
        workspace_bytes: budget for the per-chunk buffers (about (heads_per_chunk + 4) x rows x T elements
            of the compute dtype); the number of rows per chunk is derived from it.
        heads_per_chunk: query heads whose scores are computed at once (within one KV group; clipped to
            the group size). 1 keeps the workspace smallest; larger values make fewer, larger GEMMs.
        max_rows: optional upper bound on rows per chunk (tests use small values to exercise chunking).
    """

    workspace_bytes: int = 256 * 2**20
    heads_per_chunk: int = 1
    max_rows: int | None = None

    def __post_init__(self) -> None:
        if self.heads_per_chunk < 1:
            raise ValueError(f"heads_per_chunk must be >= 1, got {self.heads_per_chunk}")

    def rows_per_chunk(self, heads: int, num_keys: int, elem_size: int) -> int:
        per_row = (heads + 4) * max(num_keys, 1) * elem_size + 3 * max(num_keys, 1)
        rows = max(1, self.workspace_bytes // per_row)
        if self.max_rows is not None:
            rows = min(rows, self.max_rows)
        return int(rows)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _group_size(group: dist.ProcessGroup | None) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _plan(layout: RowLayout, num_rows: int, rows: int) -> list[tuple[int, int, int, int, int]]:
    """The chunks (b, r0, r1, k0, k1) of a capture: rows r0..r1-1 of sample b and the smallest key interval
    [k0, k1) holding every key they may see; chunks without a visible key are left out.

    Decided on the host once per call, with a fixed number of reads of the layout whatever the number of
    chunks (on a GPU each read of a device tensor is a synchronisation; pass a host layout and there are
    none)."""
    batch = layout.batch_size
    positions = layout.row_index.long().tolist()
    valid = layout.row_valid.tolist() if layout.row_valid is not None else None
    chunks, firsts = [], []
    for b in range(batch):
        # rows past sample b's last valid one (a shorter response's padding) are no chunk's
        last = num_rows if valid is None else max((r + 1 for r in range(num_rows) if valid[b][r]), default=0)
        for r0 in range(0, last, rows):
            r1 = min(last, r0 + rows)
            pos = [positions[b][r] for r in range(r0, r1) if valid is None or valid[b][r]]
            if not pos:
                continue
            k1 = max(pos) + 1
            chunks.append([b, r0, r1, 0, k1])
            if layout.segment_ids is not None or layout.key_valid is not None:
                vis = allowed_keys(layout, b, r0, r1, 0, k1, strict=False).any(0)
                firsts.append(torch.stack([vis.any().long(), vis.long().argmax()]))
    if not firsts:
        return [tuple(c) for c in chunks]
    out = []
    for c, (visible, k0) in zip(chunks, torch.stack(firsts).tolist()):
        if visible:
            c[3] = k0
            out.append(tuple(c))
    return out


class _Workspace:
    """Reusable flat buffers for the per-chunk scores (no fresh large allocation per head)."""

    def __init__(self, heads: int, rows: int, keys: int, dtype: torch.dtype, device: torch.device) -> None:
        self.scores = torch.empty(heads * rows * keys, dtype=dtype, device=device)
        self.row = torch.empty(rows * keys, dtype=dtype, device=device)

    def score_view(self, heads: int, rows: int, keys: int) -> Tensor:
        return self.scores[: heads * rows * keys].view(heads, rows, keys)

    def row_view(self, rows: int, keys: int) -> Tensor:
        return self.row[: rows * keys].view(rows, keys)


def _bias(layout: RowLayout, b: int, r0: int, r1: int, k0: int, k1: int, dtype: torch.dtype) -> Tensor:
    """Additive softmax mask [rows, keys]: 0 where the key is visible (i <= t), -inf elsewhere."""
    support = allowed_keys(layout, b, r0, r1, k0, k1, strict=False)
    bias = torch.zeros(support.shape, dtype=dtype, device=support.device)
    return bias.masked_fill_(~support, float("-inf"))


def _head_blocks(hkv: int, n_rep: int, hc: int):
    """(KV head g, query heads of g) in blocks of at most ``hc`` heads (Megatron/HF GQA order)."""
    for g in range(hkv):
        for h0 in range(0, n_rep, hc):
            yield g, range(g * n_rep + h0, g * n_rep + min(n_rep, h0 + hc))


def _scores(s: Tensor, q_rows: Tensor, heads: range, kg: Tensor, bias: Tensor, scale: float) -> Tensor:
    """s[j] = bias + scale * q_h . k_g for the heads of the block (q_rows [rows, H, d], kg [keys, d])."""
    kt = kg.transpose(0, 1)
    for j, h in enumerate(heads):
        torch.addmm(bias, q_rows[:, h].to(s.dtype), kt, alpha=scale, out=s[j])
    return s


def _rowdot(a: Tensor, b: Tensor, tmp: Tensor) -> Tensor:
    """sum_k a[r, k] b[r, k] as [rows, 1], using ``tmp`` (same shape) as scratch."""
    return torch.mul(a, b, out=tmp).sum(dim=-1, keepdim=True)


class _AttentionPolicy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, layout, plan, scale, group, rows, hc):  # noqa: D401 - autograd signature
        num_rows, batch, hq, d = q.shape
        num_keys, _, hkv, _ = k.shape
        n_rep = hq // hkv
        cdt = compute_dtype(q, k)

        out = torch.zeros(batch, num_rows, num_keys, dtype=cdt, device=q.device)
        lse = torch.zeros(batch, hq, num_rows, dtype=cdt, device=q.device)
        ws = _Workspace(hc, min(rows, num_rows), num_keys, cdt, q.device)
        for b, r0, r1, k0, k1 in plan:
            bias = _bias(layout, b, r0, r1, k0, k1, cdt)
            acc = out[b, r0:r1, k0:k1]
            q_rows = q[r0:r1, b]
            for g, heads in _head_blocks(hkv, n_rep, hc):
                kg = k[k0:k1, b, g].to(cdt)
                s = _scores(ws.score_view(len(heads), r1 - r0, k1 - k0), q_rows, heads, kg, bias, scale)
                m = s.amax(dim=-1)
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                s.sub_(m.unsqueeze(-1)).exp_()
                z = s.sum(dim=-1)
                z = torch.where(z > 0, z, torch.ones_like(z))
                s.div_(z.unsqueeze(-1))
                acc += s.sum(dim=0) if len(heads) > 1 else s[0]
                lse[b, heads.start : heads.stop, r0:r1] = m + torch.log(z)
        del ws

        if _group_size(group) > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)

        # Drop the own position (and everything not before it), renormalise in place.
        norm = torch.ones(batch, num_rows, dtype=cdt, device=q.device)
        for b in range(batch):
            for r0 in range(0, num_rows, rows):
                r1 = min(num_rows, r0 + rows)
                before = allowed_keys(layout, b, r0, r1, 0, num_keys, strict=True)
                blk = out[b, r0:r1]
                blk.masked_fill_(~before, 0.0)
                z = blk.sum(dim=-1)
                z = torch.where(z > 0, z, torch.ones_like(z))
                blk.div_(z.unsqueeze(-1))
                norm[b, r0:r1] = z

        ctx.save_for_backward(q, k, out, lse, norm)
        ctx.layout = layout
        ctx.plan = plan
        ctx.scale = scale
        ctx.rows = rows
        ctx.hc = hc
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, out, lse, norm = ctx.saved_tensors
        layout, plan, scale, rows, hc = ctx.layout, ctx.plan, ctx.scale, ctx.rows, ctx.hc
        num_rows, batch, hq, d = q.shape
        num_keys, _, hkv, _ = k.shape
        n_rep = hq // hkv
        cdt = out.dtype

        dq = torch.zeros(q.shape, dtype=cdt, device=q.device) if ctx.needs_input_grad[0] else None
        dk = torch.zeros(k.shape, dtype=cdt, device=k.device) if ctx.needs_input_grad[1] else None
        if dq is None and dk is None:
            return None, None, None, None, None, None, None, None

        ws = _Workspace(hc, min(rows, num_rows), num_keys, cdt, q.device)
        for b, r0, r1, k0, k1 in plan:
            nr, nk = r1 - r0, k1 - k0
            tmp = ws.row_view(nr, nk)
            bias = _bias(layout, b, r0, r1, k0, k1, cdt)
            before = allowed_keys(layout, b, r0, r1, k0, k1, strict=True)
            p_c = out[b, r0:r1, k0:k1]
            dp_c = grad_out[b, r0:r1, k0:k1].to(cdt)
            # Gradient w.r.t. the head sum S (renormalisation backward); p is zero outside [k0, k1).
            ds_sum = (dp_c - _rowdot(dp_c, p_c, tmp)).masked_fill_(~before, 0.0)
            ds_sum.div_(norm[b, r0:r1].unsqueeze(-1))
            del before, dp_c
            q_rows = q[r0:r1, b]
            for g, heads in _head_blocks(hkv, n_rep, hc):
                kg = k[k0:k1, b, g].to(cdt)
                s = _scores(ws.score_view(len(heads), nr, nk), q_rows, heads, kg, bias, scale)
                s.sub_(lse[b, heads.start : heads.stop, r0:r1].unsqueeze(-1)).exp_()  # recomputed probs
                for j, h in enumerate(heads):
                    # softmax backward in place: s_h <- s_h * (dS - <dS, s_h>)
                    torch.sub(ds_sum, _rowdot(s[j], ds_sum, tmp), out=tmp)
                    s[j].mul_(tmp)
                    if dq is not None:
                        dq[r0:r1, b, h].addmm_(s[j], kg, alpha=scale)
                    if dk is not None:
                        dk[k0:k1, b, g].addmm_(s[j].transpose(0, 1), q_rows[:, h].to(cdt), alpha=scale)

        gq = None if dq is None else dq.to(q.dtype)
        gk = None if dk is None else dk.to(k.dtype)
        return gq, gk, None, None, None, None, None, None


def attention_policy(
    q: Tensor,
    k: Tensor,
    layout: RowLayout,
    softmax_scale: float | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk: ChunkConfig = ChunkConfig(),
    require_grad: bool = False,
) -> Tensor:
    """Head-averaged, own-position-dropped attention policy rows p [B, R, T].

    Args:
        q: [R, B, H_local, d] post-RoPE queries of the captured rows only (see ``layout.gather_rows``).
        k: [T, B, H_kv_local, d] post-RoPE keys of the whole sequence (H_local divisible by H_kv_local);
            for a packed layout (``layout.stream_index``) the stream's keys [L, 1, H_kv_local, d].
        layout: row key indices and masks (:class:`RowLayout`).
        softmax_scale: logit scale; default 1/sqrt(d).
        tp_group: tensor-parallel group whose ranks hold the other heads; None for a single rank.
        chunk: chunking / workspace budget.
        require_grad: raise if autograd is disabled (e.g. inside a no_grad recompute region) although
            the rows are meant for a loss.

    Returns:
        p: float32 (float64 for float64 inputs) [B, R, T]; row r sums to 1 over its keys i < t
        (0 for invalid rows and rows without an earlier key). Differentiable w.r.t. q and k.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q must be [R, B, H, d] and k [T, B, H_kv, d]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if layout.stream_index is not None:  # a packed stream: each sample's keys, in the padded coordinates
        layout.validate(k.shape[0])
        k, layout = sample_keys(k, layout)
    num_rows, batch, hq, d = q.shape
    num_keys, kb, hkv, kd = k.shape
    if kb != batch or kd != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if (layout.batch_size, layout.num_rows) != (batch, num_rows):
        raise ValueError(f"layout is [B, R] = {(layout.batch_size, layout.num_rows)}, q gives {(batch, num_rows)}")
    if require_grad and not torch.is_grad_enabled():
        raise RuntimeError(
            "attention_policy called with autograd disabled but require_grad=True: the capture must not run "
            "inside a no_grad region such as megatron's selective core-attention recompute"
        )
    layout.validate(num_keys)
    hc = min(chunk.heads_per_chunk, hq // hkv)
    rows = chunk.rows_per_chunk(hc, num_keys, torch.finfo(compute_dtype(q, k)).bits // 8)
    plan = _plan(layout, num_rows, rows)   # on the layout as given (a host layout: no device reads)
    layout = layout.to(q.device)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    return _AttentionPolicy.apply(q, k, layout, plan, scale, tp_group, rows, hc)
