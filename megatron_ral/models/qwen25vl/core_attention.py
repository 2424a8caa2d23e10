"""The local spec's core attention: one module for plain, packed (``sequences``, ``groups``) and
context-parallel input.

It keeps the constructor, parameters and state of megatron-core's ``DotProductAttention`` (checkpoints do
not change) and computes, for queries q, keys k and values v of one layer (GQA: a query head reads the
K/V head of its group):

    out_t = sum_j softmax_j(q_t . k_j * scale  over the keys j visible to t) v_j

Which keys are visible:

- **plain** (no layout, CP = 1): megatron's semantics, through torch's fused SDPA exactly as
  ``SDPADotProductAttention`` (causal without a mask, or the given bool mask); KV-cache steps too.
- **a layout** (:class:`~megatron_ral.models.qwen25vl.attention_layout.AttentionLayout`, carried to this
  module by :class:`LayoutParams`, megatron's ``packed_seq_params`` slot with ``qkv_format='sbhd'``, so none
  of megatron's THD paths runs and the rotary embedding uses the per-token M-RoPE positions it was given):
  the layout's visibility rule (block-diagonal causal for ``sequences``; prompt + own response for
  ``groups``; causal for ``none``).
- **context parallelism** (CP = C > 1; megatron's load-balanced split, this rank holding chunks i and
  2C-1-i of the stream): K and V are all-gathered over the CP group (small under GQA; the backward
  reduce-scatters their gradients to the ranks that own them) and the rule is applied with each local
  query's *global* token index. Without a layout the stream is plain causal.

The masked cases run in query blocks: a block of consecutive queries reads only the key ranges its queries
can see (its causal run, plus the prompts of its responses), with a boolean mask of that block alone;
nothing of size [local queries, global keys] is ever built. Without CP, a span that sees no prompt (a packed
sequence, a group's prompt, the tail padding) is one block of plain causal attention over its own keys
(torch's fused causal kernel, no mask: as fast per token as the padded path); a response's queries run in
blocks over their prompt and their own keys. The backward recomputes each block's forward (so no block's
mask or scores are kept between forward and backward); this costs one extra attention forward on these
paths, not on the plain one.

On CPU without CP, a block whose queries all share one rule (a response's block: its prompt, its earlier
tokens, its own causal square) runs as up to three unmasked / causal parts through torch's fused CPU kernel,
merged by log-sum-exp (out = sum_p exp(lse_p - lse) out_p); the output and log-sum-exp are kept, and the
backward runs each part's kernel backward with the merged ones (no recomputation, no mask). Same values as
the masked form to rounding (tested in float64); elsewhere (GPU local spec, CP) the masked blocks run.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_ral.models.qwen25vl.attention_layout import AttentionLayout
from megatron_ral.models.qwen25vl.context_parallel import gather_sequence_cp  # noqa: F401 - re-exported
from megatron_ral.models.qwen25vl.sdpa_attention import SDPADotProductAttention

DEFAULT_QUERY_BLOCK = 512
MASK_CACHE_ELEMENTS = 64 * 2**20  # bool mask elements a layout keeps for its masked blocks (64 MiB)


@dataclass
class LayoutParams(PackedSeqParams):
    """megatron's ``packed_seq_params`` slot carrying an :class:`AttentionLayout` to the core attention.

    ``qkv_format`` stays 'sbhd': megatron-core's attention then keeps [s, b, h, d] tensors and applies the
    rotary embedding per token (no ``cu_seqlens`` path, which would reuse the first sequence's positions),
    and its M-RoPE falls back to megatron's CP group (``cp_group`` None)."""

    qkv_format: str = "sbhd"
    layout: AttentionLayout | None = None


# ---------------------------------------------------------------------------- query blocks
@dataclass(frozen=True)
class _Block:
    q: slice                       # local query positions
    t: torch.Tensor                # [qb] their global indices
    causal_start: torch.Tensor     # [qb]
    prefix_start: torch.Tensor     # [qb]
    prefix_end: torch.Tensor       # [qb]
    keys: tuple[int, int] | torch.Tensor  # one key range [lo, hi) or the global key indices read
    causal: bool = False           # plain causal attention of the queries over keys [lo, hi), the same tokens
    mask: torch.Tensor | None = None  # the block's bool mask, kept with the layout when small (else rebuilt)
    parts: tuple | None = None     # ((lo, hi, causal), ...): the visible keys as unmasked / causal ranges


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def query_blocks(layout: AttentionLayout, cp_size: int, cp_rank: int, block: int,
                 device: torch.device | str) -> list[_Block]:
    """The blocks of this rank's queries and the key ranges each reads (cached on the layout)."""
    key = ("blocks", cp_size, cp_rank, block, str(device))
    cached = layout._cache.get(key)
    if cached is not None:
        return cached
    causal, p_start, p_end = layout.visibility("cpu")
    causal_l, p_start_l, p_end_l = causal.tolist(), p_start.tolist(), p_end.tolist()
    dev_vis = layout.visibility(device)
    # runs of local queries that are contiguous in the stream: (local start, global start, length)
    blocks = []
    if cp_size == 1 and layout.kind != "none":
        # each span apart: one causal block if it sees no prompt, else query blocks over prompt + itself
        runs = []
        ends = [(sp.start, sp.end) for sp in layout.spans]
        if ends[-1][1] < layout.length:
            ends.append((ends[-1][1], layout.length))  # the tail padding: a causal run of its own
        for a, b in ends:
            if p_end_l[a] > p_start_l[a]:
                runs.append((a, a, b - a))
                continue
            blocks.append(_Block(q=slice(a, b), t=torch.arange(a, b, device=device), causal_start=dev_vis[0][a:b],
                                 prefix_start=dev_vis[1][a:b], prefix_end=dev_vis[2][a:b], keys=(a, b), causal=True))
    elif cp_size == 1:
        runs = [(0, 0, layout.length)]
    else:
        chunk = layout.length // (2 * cp_size)
        runs = [(0, cp_rank * chunk, chunk), (chunk, (2 * cp_size - 1 - cp_rank) * chunk, chunk)]
    for local0, global0, n in runs:
        for off in range(0, n, block):
            a, b = global0 + off, global0 + min(off + block, n)
            ranges = [(min(causal_l[a:b]), b)]
            ranges += {(p_start_l[t], p_end_l[t]) for t in range(a, b)}
            merged = _merge(ranges)
            keys = merged[0] if len(merged) == 1 else torch.cat(
                [torch.arange(lo, hi) for lo, hi in merged]).to(device)
            blocks.append(_Block(q=slice(local0 + off, local0 + off + (b - a)),
                                 t=torch.arange(a, b, device=device),
                                 causal_start=dev_vis[0][a:b], prefix_start=dev_vis[1][a:b],
                                 prefix_end=dev_vis[2][a:b], keys=keys))
    blocks.sort(key=lambda blk: blk.q.start)
    if cp_size == 1 and lse_parts_available(device):
        blocks = [dataclasses.replace(blk, parts=_parts(blk, causal_l, p_start_l, p_end_l)) if not blk.causal else blk
                  for blk in blocks]
    # the masks depend on the layout only: built once for every layer and pass when they are small
    masked = [blk for blk in blocks if not blk.causal]
    if sum(blk.t.numel() * _num_keys(blk) for blk in masked) <= MASK_CACHE_ELEMENTS:
        blocks = [dataclasses.replace(blk, mask=_block_mask(blk)) if not blk.causal else blk for blk in blocks]
    layout._cache[key] = blocks
    return blocks


def lse_parts_available(device: torch.device | str) -> bool:
    """Whether the log-sum-exp parts path runs on ``device``: torch's fused CPU attention kernel that returns
    its log-sum-exp (and takes it back in its backward). Elsewhere the masked blocks stay masked."""
    return torch.device(device).type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _parts(blk: _Block, causal_l: list, p_start_l: list, p_end_l: list) -> tuple | None:
    """A block's visible keys as at most three ranges each read whole or causally, when every query of the
    block has the same rule (one response's queries: its prompt, its earlier tokens, the block's own
    causal square); None otherwise (the block keeps its mask)."""
    a, b = blk.q.start, blk.q.stop  # without CP the local and global positions are the same
    cs, ps, pe = causal_l[a], p_start_l[a], p_end_l[a]
    if len({(causal_l[t], p_start_l[t], p_end_l[t]) for t in range(a, b)}) != 1:
        return None
    if cs > a or (pe > ps and pe > cs):  # the prefix must lie before the causal run
        return None
    parts = []
    if pe > ps:
        parts.append((ps, pe, False))
    if a > cs:
        parts.append((cs, a, False))
    parts.append((a, b, True))
    return tuple(parts)


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, g, L, d] -> [b, heads, L, d]: query head i reads K/V head i // (heads / g), as SDPA's GQA."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _reduce_kv(g: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of ``_expand_kv``: [b, heads, L, d] summed back to [b, groups, L, d]."""
    b, h, n, d = g.shape
    return g if h == groups else g.view(b, groups, h // groups, n, d).sum(2)


def _parts_forward(q, k, v, blk: _Block, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax attention of q over the block's key parts, merged by log-sum-exp (in fp32, fp64 for fp64
    input): out [b, h, qb, d] in q's dtype, lse [b, h, qb]."""
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    heads = q.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q = q.contiguous()
    out = lse = None
    for lo, hi, causal in blk.parts:
        o, l = fused(q, _expand_kv(k[:, :, lo:hi], heads).contiguous(), _expand_kv(v[:, :, lo:hi], heads).contiguous(),
                     0.0, causal, scale=scale)
        o, l = o.to(acc), l.to(acc)
        if out is None:
            out, lse = o, l
            continue
        merged = torch.logaddexp(lse, l)
        out = torch.exp(lse - merged)[..., None] * out + torch.exp(l - merged)[..., None] * o
        lse = merged
    return out.to(q.dtype), lse


def _parts_backward(grad, q, k, v, out, lse, blk: _Block, scale: float, dk, dv) -> torch.Tensor:
    """dq of a parts block; dk / dv accumulated in place. Each part's kernel backward takes the merged output
    and log-sum-exp: its probabilities are then the merged softmax's over its keys, which is the gradient."""
    fused_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    heads, groups = q.shape[1], k.shape[1]
    grad, q, out, lse = grad.contiguous(), q.contiguous(), out.contiguous(), lse.contiguous()
    dq = torch.zeros_like(q)
    for lo, hi, causal in blk.parts:
        gq, gk, gv = fused_bwd(grad, q, _expand_kv(k[:, :, lo:hi], heads).contiguous(),
                               _expand_kv(v[:, :, lo:hi], heads).contiguous(), out, lse, 0.0, causal, scale=scale)
        dq += gq
        dk[:, :, lo:hi] += _reduce_kv(gk, groups)
        dv[:, :, lo:hi] += _reduce_kv(gv, groups)
    return dq


def _num_keys(blk: _Block) -> int:
    return blk.keys[1] - blk.keys[0] if isinstance(blk.keys, tuple) else int(blk.keys.numel())


def _block_keys(x: torch.Tensor, blk: _Block) -> torch.Tensor:
    """The keys/values a block reads from x [b, g, L, d]."""
    if isinstance(blk.keys, tuple):
        lo, hi = blk.keys
        return x[:, :, lo:hi]
    return x.index_select(2, blk.keys)


def _block_mask(blk: _Block) -> torch.Tensor:
    """bool mask [qb, keys] of a block, True = visible (every row sees itself)."""
    if isinstance(blk.keys, tuple):
        j = torch.arange(blk.keys[0], blk.keys[1], device=blk.t.device)
    else:
        j = blk.keys
    j = j[None, :]
    visible = ((j >= blk.causal_start[:, None]) & (j <= blk.t[:, None])) | (
        (j >= blk.prefix_start[:, None]) & (j < blk.prefix_end[:, None]))
    return visible


def _block_attention(q, k, v, blk: _Block, scale: float) -> torch.Tensor:
    """Attention of a block's queries q over the keys/values it reads (k/v: the block's own, or all)."""
    gqa = k.shape[1] != q.shape[1]
    if blk.causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = blk.mask if blk.mask is not None else _block_mask(blk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class _BlockedAttention(torch.autograd.Function):
    """Masked attention over query blocks; backward recomputes each block (no masks or scores kept).

    q [b, h, Lq, d] (local queries), k/v [b, g, Lk, d] (global keys) -> out [b, h, Lq, d]."""

    @staticmethod
    def forward(ctx, q, k, v, blocks, scale):
        out = torch.empty_like(q)
        lse = None
        for blk in blocks:
            if blk.parts is not None:
                o, l = _parts_forward(q[:, :, blk.q], k, v, blk, scale)
                out[:, :, blk.q] = o
                if lse is None:
                    lse = q.new_zeros(q.shape[:3], dtype=l.dtype)
                lse[:, :, blk.q] = l
                continue
            out[:, :, blk.q] = _block_attention(q[:, :, blk.q], _block_keys(k, blk), _block_keys(v, blk), blk, scale)
        if lse is not None:  # the parts blocks keep their output and log-sum-exp: no recomputation in backward
            ctx.save_for_backward(q, k, v, out, lse)
        else:
            ctx.save_for_backward(q, k, v)
        ctx.blocks, ctx.scale = blocks, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        q, k, v = saved[:3]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for blk in ctx.blocks:
            if blk.parts is not None:
                out, lse = saved[3], saved[4]
                dq[:, :, blk.q] = _parts_backward(grad_out[:, :, blk.q], q[:, :, blk.q], k, v, out[:, :, blk.q],
                                                  lse[:, :, blk.q], blk, ctx.scale, dk, dv)
                continue
            with torch.enable_grad():
                qb = q[:, :, blk.q].detach().requires_grad_(True)
                kb = _block_keys(k, blk).detach().requires_grad_(True)
                vb = _block_keys(v, blk).detach().requires_grad_(True)
                out = _block_attention(qb, kb, vb, blk, ctx.scale)
                gq, gk, gv = torch.autograd.grad(out, (qb, kb, vb), grad_out[:, :, blk.q])
            dq[:, :, blk.q] = gq
            if isinstance(blk.keys, tuple):
                dk[:, :, blk.keys[0]:blk.keys[1]] += gk
                dv[:, :, blk.keys[0]:blk.keys[1]] += gv
            else:
                dk.index_add_(2, blk.keys, gk)
                dv.index_add_(2, blk.keys, gv)
        return dq, dk, dv, None, None


# ---------------------------------------------------------------------------- the module
class LocalCoreAttention(SDPADotProductAttention):
    """megatron's ``DotProductAttention`` (same constructor, parameters, state) for plain, packed and CP input.

    ``query_block`` (a spec param): queries per block on the masked paths (memory of one block's mask and
    scores is ``query_block`` x the keys it reads)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None,
                 query_block: int = DEFAULT_QUERY_BLOCK) -> None:
        cp_size = int(config.context_parallel_size)
        base_config = config
        if cp_size > 1:  # megatron's module asserts CP == 1; its state does not depend on CP
            base_config = copy.copy(config)
            base_config.context_parallel_size = 1
        super().__init__(base_config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.config = config
        if query_block < 1:
            raise ValueError(f"query_block must be >= 1, got {query_block}")
        self.query_block = int(query_block)
        self.cp_size = cp_size
        self.cp_group = None
        if cp_size > 1:
            group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
            if group is None:
                group = parallel_state.get_context_parallel_group(check_initialized=False)
            if group is None or dist.get_world_size(group) != cp_size:
                raise ValueError(f"context_parallel_size={cp_size} but no context-parallel group of that size exists "
                                 "(initialise megatron's parallel state with it)")
            self.cp_group = group

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        layout = None
        if packed_seq_params is not None:
            if not isinstance(packed_seq_params, LayoutParams):
                raise NotImplementedError(
                    "packed (THD) sequences need the Transformer Engine layer spec; the local spec takes an "
                    "AttentionLayout (LayoutParams)")
            layout = packed_seq_params.layout
        if layout is None and self.cp_size == 1:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if layout is not None and layout.kind == "none" and self.cp_size == 1:
            if attention_mask is not None:
                raise ValueError("an attention layout defines which keys each token sees: pass attention_mask=None")
            return super().forward(query, key, value, None, attn_mask_type, attention_bias)
        return self._masked_forward(query, key, value, attention_mask, attention_bias, layout)

    def _plain_layout(self, batch: int, length: int) -> AttentionLayout:
        """Causal layout of a plain CP input (kept while the shape repeats, so its blocks are planned once)."""
        cached = getattr(self, "_plain", None)
        if cached is None or (cached.batch_size, cached.length) != (batch, length):
            cached = AttentionLayout.plain(batch, length)
            self._plain = cached
        return cached

    def _masked_forward(self, query, key, value, attention_mask, attention_bias, layout):
        if attention_mask is not None:
            raise ValueError("an attention layout (or context parallelism) defines which keys each token sees: "
                             "pass attention_mask=None")
        if attention_bias is not None:
            raise NotImplementedError("attention bias is not supported by the local core attention")
        if self.training and self.attention_dropout.p > 0:
            raise NotImplementedError("attention dropout is not implemented for packed or context-parallel input")
        sq, b, heads, dim = query.shape
        if key.shape[0] != sq:
            raise ValueError(f"packed / context-parallel attention needs as many queries as keys, got {sq} and "
                             f"{key.shape[0]} (KV-cache steps take plain input)")
        cp_rank = 0
        if self.cp_size > 1:
            cp_rank = dist.get_rank(self.cp_group)
            key = gather_sequence_cp(key, self.cp_group)
            value = gather_sequence_cp(value, self.cp_group)
        total = key.shape[0]
        if layout is None:
            layout = self._plain_layout(b, total)
        if layout.length != total or layout.batch_size != b:
            raise ValueError(
                f"the layout describes b={layout.batch_size} rows of {layout.length} tokens, the attention input "
                f"has b={b} rows of {total} tokens (CP={self.cp_size})")
        blocks = query_blocks(layout, self.cp_size, cp_rank, self.query_block, query.device)
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)    # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        out = _BlockedAttention.apply(q, k, v, blocks, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)
