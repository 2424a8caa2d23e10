"""The Transformer Engine spec's core attention reading the project's layouts (packed ``sequences`` as THD).

The trainer hands every layer an :class:`AttentionLayout` in megatron's ``packed_seq_params`` slot
(:class:`~megatron_ral.models.qwen25vl.core_attention.LayoutParams`, ``qkv_format='sbhd'``): megatron's attention
then keeps [s, b, h, d] tensors and rotates them with the per-token M-RoPE positions of the layout (never its
``cu_seqlens`` rotary path). Transformer Engine's ``DotProductAttention`` would read such params as one plain
causal sequence, across the packed sequences' borders; this subclass translates the layout first:

- ``sequences`` (one row of whole sequences): TE's THD path. The stream [t, 1, h, d] is passed as [t, h, d] with
  ``cu_seqlens`` = the spans' borders (the tail padding, if any, as one more segment that no real token sees),
  causal within each segment (megatron turns ``causal`` into TE's ``padding_causal`` for THD); the output
  [t, h*d] is returned as [t, 1, h*d], the shape the attention module continues with.
- ``none`` (a padded batch): plain causal attention, no params.
- ``groups`` (responses that see their prompt): refused with one line; TE has no mask type for a prefix
  shared by several causal segments (the local spec serves it).

Under TE's context parallelism, THD input is split per sequence (each sequence in 2C chunks), while the trainer
splits the whole stream; packed input with CP > 1 is refused here and by the config.

Never run in this project's CI (no CUDA, no Transformer Engine there): the translation is tested on CPU,
through a reference with TE's documented THD semantics as the base class, against the layout's own
visibility rule (``tests/unit/test_model_te_core_attention.py``).
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from megatron_ral.models.qwen25vl.attention_layout import AttentionLayout

_CACHE: dict[type, type] = {}


def thd_segments(layout: AttentionLayout) -> list[int]:
    """Borders ``[0, e_1, ..., L]`` of the THD segments of a ``sequences`` layout: one per packed sequence, and
    the tail padding (tokens after the last span) as a last segment."""
    if layout.kind != "sequences":
        raise ValueError(f"THD segments exist for a 'sequences' layout, not {layout.kind!r}")
    borders = [0]
    for span in layout.spans:
        if span.start != borders[-1]:
            raise ValueError(f"the spans of a 'sequences' layout must tile the stream (a gap at {borders[-1]})")
        borders.append(span.end)
    if borders[-1] < layout.length:
        borders.append(layout.length)
    return borders


def thd_params(layout: AttentionLayout, device: torch.device | str) -> PackedSeqParams:
    """megatron's ``PackedSeqParams`` (THD) of a ``sequences`` layout: int32 ``cu_seqlens`` on ``device`` for
    queries and keys alike, the longest segment as ``max_seqlen``."""
    borders = thd_segments(layout)
    cu = torch.tensor(borders, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(borders, borders[1:]))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def te_layout_core_attention(base: type) -> type:
    """A subclass of the core-attention class ``base`` (Transformer Engine's ``TEDotProductAttention``; same
    constructor) that reads a layout from ``packed_seq_params`` (module docstring)."""
    if base in _CACHE:
        return _CACHE[base]

    class LayoutCoreAttention(base):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            layout = getattr(packed_seq_params, "layout", None)
            if layout is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                       packed_seq_params, **kwargs)
            if attention_mask is not None:
                raise ValueError("an attention layout defines which keys each token sees: pass attention_mask=None")
            mask_type = AttnMaskType.causal if attn_mask_type is None else attn_mask_type
            if layout.kind == "none":
                return super().forward(query, key, value, None, mask_type, attention_bias, None, **kwargs)
            if layout.kind != "sequences":
                raise NotImplementedError(
                    f"training.packing {layout.kind!r} under the Transformer Engine layer spec: TE has no mask for "
                    "responses that share a prompt; use training.packing: sequences or none, or model.layer_spec: local")
            if int(getattr(self.config, "context_parallel_size", 1)) > 1:
                raise NotImplementedError("packed sequences under Transformer Engine with context parallelism "
                                          "(TE splits THD input per sequence; use training.packing: none)")
            if query.dim() != 4 or query.shape[1] != 1 or query.shape[0] != layout.length:
                raise ValueError(f"a packed stream is [{layout.length}, 1, heads, dim]; got {tuple(query.shape)}")
            cached = getattr(packed_seq_params, "_thd", None)
            if cached is None or cached.cu_seqlens_q.device != query.device:
                cached = thd_params(layout, query.device)
                packed_seq_params._thd = cached  # once per forward of the model, not per layer
            out = super().forward(query.squeeze(1), key.squeeze(1), value.squeeze(1), None, mask_type, attention_bias,
                                  cached, **kwargs)
            return out.reshape(out.shape[0], 1, -1)

    LayoutCoreAttention.__name__ = f"Layout{base.__name__}"
    LayoutCoreAttention.__qualname__ = LayoutCoreAttention.__name__
    _CACHE[base] = LayoutCoreAttention
    return LayoutCoreAttention
