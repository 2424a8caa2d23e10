"""Core attention of the local (pure-torch) layer spec through torch's fused ``scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the scores [b, heads, sq, sk], masks them in
place and keeps them for backward; on CPU that makes attention the slowest part of a training pass and its
memory quadratic in the sequence. This subclass keeps the constructor, parameters and state of megatron's
module (checkpoints do not change) and computes the same function with SDPA:

    softmax(q k^T * scale + mask) v      with megatron's mask semantics:
        attention_mask None  -> causal (sq == sk), as megatron's torch softmax builds it;
        attention_mask bool [b or 1, 1, sq, sk], True = masked -> exactly those entries masked (no extra
        causal mask, as in megatron); a row with every key masked (a left-padding position) gets the
        uniform average of the values, as megatron's fill value gives it.

Grouped-query attention uses SDPA's ``enable_gqa`` (no K/V expansion). Features of megatron's module that
Qwen2.5-VL does not use are refused at construction (softmax offsets, sliding windows, query-key layer
scaling); attention dropout runs inside megatron's RNG tracker like megatron's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention

MASKED_SCORE = -10000.0  # megatron's attention_mask_func fill value (exp underflows to 0 in every dtype)


class SDPADotProductAttention(DotProductAttention):
    """megatron's ``DotProductAttention`` computed with ``torch.nn.functional.scaled_dot_product_attention``."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPA core attention supports softmax_type 'vanilla' only, got {config.softmax_type!r}")
        if config.window_size is not None:
            raise ValueError("SDPA core attention does not implement sliding-window attention")
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPA core attention does not implement apply_query_key_layer_scaling")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError("packed (THD) sequences need the Transformer Engine layer spec")
        if attention_bias is not None:
            raise NotImplementedError("attention bias is not supported by the local core attention")
        sq, b, heads, dim = query.shape
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)    # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        mask, causal, empty_rows = None, False, None
        if attention_mask is None:
            if sq > 1:
                if sq != sk:
                    raise ValueError(f"causal attention needs as many queries as keys, got {sq} and {sk}")
                causal = True
        else:
            masked = attention_mask.to(q.device)
            # a row with every key masked: megatron's fill makes its softmax uniform over the keys
            empty_rows = masked.all(dim=-1, keepdim=True)  # [b, 1, sq, 1]
            if not bool(empty_rows.any()):
                empty_rows = None
            else:
                masked = masked & ~empty_rows
            mask = torch.zeros(masked.shape, dtype=q.dtype, device=q.device).masked_fill(masked, MASKED_SCORE)
        dropout = self.attention_dropout.p if self.training else 0.0
        kwargs = dict(attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale,
                      enable_gqa=k.shape[1] != heads)
        if dropout > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        if empty_rows is not None:
            uniform = v.mean(dim=2, keepdim=True).repeat_interleave(heads // v.shape[1], dim=1)  # [b, np, 1, hn]
            out = torch.where(empty_rows, uniform.expand_as(out), out)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)
