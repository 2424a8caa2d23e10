"""Decode-time core attention, the same for every layer spec: grouped queries, rotated-key cache.

Two costs of megatron's static KV path grow with the cached length at every decode step:

1. megatron's local ``DotProductAttention`` expands the cached keys and values to one copy per query
   head (``repeat_interleave``), copying the whole cache heads/kv_heads times per layer;
2. the cache holds keys *before* rotary embedding, so every layer re-rotates all cached keys (and the
   model recomputes the rotary table of every position) at every step, with the local spec and with
   Transformer Engine's alike (megatron applies RoPE after reading the cache in both).

``DecodeAttention`` replaces the core attention of each layer during generation, whatever the layer
spec (local torch or Transformer Engine). It computes attention with the query heads of a KV group
stacked against that group's keys (no expansion):

    q (sq, B, G*r, d) -> (B, G, r*sq, d);  scores = q k^T * scale  (B, G, r*sq, sk)
    probs = softmax(scores masked with -10000, fp32);  out = probs v  -> (sq, B, G*r*d)

and, in ``rotate_in_cache`` mode, applies M-RoPE itself: the model's rotary embedding is switched
off for the forward (megatron then stores un-rotated keys and hands over the cache view), and the
core attention rotates the query and the sq newly written key columns *in place in the cache* with
the frequencies of the new positions only (computed once per forward by megatron's own
MultimodalRotaryEmbedding and rotation function). Cached keys are thus rotated exactly once.

Under the Transformer Engine spec an unmasked (causal) prefill still runs TE's own kernel on the
rotated query and keys (flash / fused attention for the long prompt; not under context parallelism, where
each CP rank generates its own prompts); decode steps run the grouped
attention above, which applies the padding mask TE would ignore. Ragged prompts are not prefilled
left-padded under TE (that would need the mask, hence this module's fp32 scores over the whole prompt):
the session prefills them per group of equal length (``session.DecodeSession``).
Training and scoring forwards never see this module: TE serves them directly.

Masks are megatron's: bool, True = masked, 4-D and broadcastable to (B, 1, sq, sk); without a mask,
causal when sq > 1 (the queries are the last sq of the sk positions).
"""

from __future__ import annotations

import contextlib
import math

import torch

MASK_VALUE = -10000.0  # megatron's attention_mask_func fill value
QUERY_BLOCK = 1024


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, softmax_scale: float,
                      softmax_in_fp32: bool = True, query_block: int = QUERY_BLOCK) -> torch.Tensor:
    """Core attention of megatron layouts: query (sq, B, H, d), key / value (sk, B, G, d) with H = G*r;
    returns (sq, B, H*d). Long prefills run in blocks of ``query_block`` queries, which bounds the
    score tensor to B*H*query_block*sk."""
    sq, sk = query.shape[0], key.shape[0]
    if attention_mask is None and sq > 1:
        attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).triu(sk - sq + 1)[None, None]
    if sq <= query_block:
        return _grouped_block(query, key, value, attention_mask, softmax_scale, softmax_in_fp32)
    outs = []
    for start in range(0, sq, query_block):
        end = min(start + query_block, sq)
        mask = attention_mask
        if mask is not None and mask.shape[-2] != 1:
            mask = mask[..., start:end, :]
        outs.append(_grouped_block(query[start:end], key, value, mask, softmax_scale, softmax_in_fp32))
    return torch.cat(outs, dim=0)


def _grouped_block(query, key, value, attention_mask, softmax_scale, softmax_in_fp32):
    sq, batch, heads, dim = query.shape
    sk, _, groups, _ = key.shape
    r = heads // groups
    q = query.permute(1, 2, 0, 3).reshape(batch, groups, r * sq, dim)
    k = key.permute(1, 2, 0, 3)      # (B, G, sk, d), a view of the cache
    v = value.permute(1, 2, 0, 3)
    scores = torch.matmul(q, k.transpose(-1, -2))
    if softmax_in_fp32:
        scores = scores.float()
    scores = scores.mul_(softmax_scale).view(batch, groups, r, sq, sk)
    if attention_mask is not None:   # (B or 1, 1, sq or 1, sk) -> broadcast over r
        scores = scores.masked_fill(attention_mask[:, :, None], MASK_VALUE)
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(batch, groups, r * sq, sk)
    out = torch.matmul(probs, v)     # (B, G, r*sq, d)
    return out.view(batch, heads, sq, dim).permute(2, 0, 1, 3).reshape(sq, batch, heads * dim)


class NewTokenRotary:
    """Rotary frequencies (sq, B, 1, d) of the tokens of the current forward, shared by all layers."""

    def __init__(self, language_model):
        self.language_model = language_model
        self.freqs: torch.Tensor | None = None

    def set_positions(self, position_ids: torch.Tensor) -> None:
        """position_ids (3, B, sq) of the tokens being fed (never split over context-parallel ranks:
        generation runs every CP rank as a whole replica)."""
        from megatron_ral.models.qwen25vl.context_parallel import unsplit_rotary

        lm = self.language_model
        with unsplit_rotary(lm.rotary_pos_emb):
            self.freqs = lm.rotary_pos_emb(position_ids, lm.mrope_section)


class DecodeAttention(torch.nn.Module):
    """Drop-in for a layer's core attention during generation (megatron's local ``DotProductAttention``
    or ``TEDotProductAttention``): same scale, fp32 softmax, no dropout; with ``rotary`` it also
    rotates the query and the new cached keys. ``prefill_with_original``: run an unmasked multi-token
    forward (the prefill) through the original module, after the rotation (the TE spec's fused kernels)."""

    reads_attention_mask = True  # see Qwen25VLModel.core_attention_reads_masks

    def __init__(self, original: torch.nn.Module, rotary: NewTokenRotary | None = None,
                 prefill_with_original: bool = False):
        super().__init__()
        self.original = original
        self.rotary = rotary
        self.prefill_with_original = prefill_with_original
        cfg = original.config
        # the scale both megatron modules use (TE's and the local one): config.softmax_scale or 1/sqrt(d)
        scale = getattr(cfg, "softmax_scale", None)
        self.softmax_scale = float(scale if scale is not None else 1.0 / math.sqrt(cfg.kv_channels))
        self.softmax_in_fp32 = bool(cfg.attention_softmax_in_fp32 or cfg.fp16 or cfg.bf16)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("decode attention takes no attention bias / packed sequences")
        if self.rotary is not None:
            from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

            freqs = self.rotary.freqs
            cfg = self.original.config
            sq = query.shape[0]
            if freqs is None or freqs.shape[0] != sq:
                raise RuntimeError("rotary frequencies of the new tokens were not set for this forward")
            query = apply_rotary_pos_emb(query, freqs, cfg)
            new_keys = key[key.shape[0] - sq:]   # the columns megatron just wrote into the cache
            new_keys.copy_(apply_rotary_pos_emb(new_keys, freqs, cfg))
        if self.prefill_with_original and query.shape[0] > 1 and attention_mask is None:
            return self.original(query, key, value, None, attn_mask_type=attn_mask_type)
        return grouped_attention(query, key, value, attention_mask, self.softmax_scale, self.softmax_in_fp32)


def _swappable(model) -> list:
    """(attention, core attention) of every layer of this stage, whatever the layer spec; [] when a
    layer cannot take DecodeAttention (a capture hook is set, which needs the model's own attention
    call, or attention dropout is on): the model's own attention path is used then."""
    pairs = []
    for layer in model.language_model.decoder.layers:
        attn = layer.self_attention
        core = attn.core_attention
        if getattr(core, "capture_hook", None) is not None or core.config.attention_dropout:
            return []
        pairs.append((attn, core))
    return pairs


def rotated_cache_supported(model) -> bool:
    """True when every layer of this stage can use DecodeAttention with the rotated-key cache."""
    lm = model.language_model
    return lm.position_embedding_type == "mrope" and bool(_swappable(model))


@contextlib.contextmanager
def decode_attention(model, rotary: NewTokenRotary | None = None):
    """Swap DecodeAttention into every layer of this stage inside the block; with ``rotary`` the
    model's rotary embedding is off and the core attention applies it (rotated-key cache). Under the
    Transformer Engine spec (``model.backend == "te"``) causal prefills keep TE's kernel. A model that
    cannot be swapped (a capture hook set) runs unchanged; ``rotary`` then is an error."""
    pairs = _swappable(model)
    if rotary is not None and not pairs:
        raise RuntimeError("the rotated-key cache needs every layer's core attention (no capture hook set)")
    # (not under context parallelism: TE's kernel would run its CP exchange between replicas that generate
    # different prompts)
    prefill_with_original = getattr(model, "backend", "local") == "te" and model.config.context_parallel_size == 1
    lm = model.language_model
    saved_type = lm.position_embedding_type
    try:
        for attn, core in pairs:
            attn.core_attention = DecodeAttention(core, rotary, prefill_with_original)
        if rotary is not None:
            lm.position_embedding_type = "none"
        yield
    finally:
        lm.position_embedding_type = saved_type
        for attn, core in pairs:
            attn.core_attention = core
