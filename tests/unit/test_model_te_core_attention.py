"""The Transformer Engine spec's layout translation (models/qwen25vl/te_core_attention.py) on CPU.

Transformer Engine does not install here (no CUDA). The subclass under test only translates the layout into
the call TE documents for THD input; its base here is ``ReferenceTHD``, which computes exactly what TE's
``DotProductAttention`` is documented to compute for those calls (qkv_format "thd": [t, heads, d] tensors,
causal attention within each ``cu_seqlens`` segment, output [t, heads * d]; "sbhd" without params: causal
over each row). The result is checked against the layout's own visibility rule (``dense_mask``) in float64:
a wrong border, a segment missed, a lost tail, a GQA mix-up or a wrong reshape fails it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from megatron_ral.models.qwen25vl.attention_layout import AttentionLayout
from megatron_ral.models.qwen25vl.core_attention import LayoutParams
from megatron_ral.models.qwen25vl.te_core_attention import te_layout_core_attention, thd_params, thd_segments

HEADS, GROUPS, DIM = 4, 2, 8


class _Config:
    context_parallel_size = 1


class ReferenceTHD(torch.nn.Module):
    """TE's DotProductAttention for the calls the wrapper makes (megatron's TEDotProductAttention signature)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.config = _Config()
        self.calls: list[dict] = []

    def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None,
                packed_seq_params=None):
        self.calls.append(dict(shape=tuple(query.shape), mask_type=attn_mask_type, params=packed_seq_params))
        assert attention_mask is None and attention_bias is None
        assert attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        rep = query.shape[-2] // key.shape[-2]
        if packed_seq_params is None:                    # sbhd: [s, b, h, d] -> [s, b, h * d], causal per row
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
        assert packed_seq_params.qkv_format == "thd" and query.dim() == 3
        cu = packed_seq_params.cu_seqlens_q.tolist()
        assert torch.equal(packed_seq_params.cu_seqlens_kv, packed_seq_params.cu_seqlens_q)
        assert packed_seq_params.cu_seqlens_q.dtype == torch.int32 and cu[-1] == query.shape[0]
        assert packed_seq_params.max_seqlen_q == max(b - a for a, b in zip(cu, cu[1:]))
        out = torch.empty(query.shape[0], query.shape[1] * query.shape[2], dtype=query.dtype)
        for a, b in zip(cu, cu[1:]):
            q, k, v = (x[a:b].transpose(0, 1) for x in (query, key, value))
            k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            out[a:b] = o.transpose(0, 1).reshape(b - a, -1)
        return out


def _qkv(length: int, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(length, batch, HEADS, DIM, generator=g, dtype=torch.float64)
    k = torch.randn(length, batch, GROUPS, DIM, generator=g, dtype=torch.float64)
    v = torch.randn(length, batch, GROUPS, DIM, generator=g, dtype=torch.float64)
    return q, k, v


def _dense(q, k, v, mask, scale):
    """softmax(q k^T * scale over the visible keys) v, float64, [L, 1, heads * dim]."""
    rep = HEADS // GROUPS
    qh, kh, vh = q[:, 0].transpose(0, 1), k[:, 0].transpose(0, 1), v[:, 0].transpose(0, 1)
    kh, vh = kh.repeat_interleave(rep, 0), vh.repeat_interleave(rep, 0)
    s = (qh @ kh.transpose(1, 2)) * scale
    s = s.masked_fill(~mask[None], float("-inf"))
    return (torch.softmax(s, -1) @ vh).transpose(0, 1).reshape(q.shape[0], 1, -1)


@pytest.mark.parametrize("lengths,pad", [([5, 1, 9, 3], 4), ([7], 1), ([3, 3], 8)])
def test_sequences_layout_runs_as_thd_segments_equal_to_the_layout_rule(lengths, pad):
    layout = AttentionLayout.packed_sequences(lengths, pad_to_multiple=pad)
    scale = 1 / math.sqrt(DIM)
    core = te_layout_core_attention(ReferenceTHD)(scale)
    q, k, v = _qkv(layout.length)
    out = core(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=LayoutParams(layout=layout))
    assert out.shape == (layout.length, 1, HEADS * DIM)
    real = sum(lengths)
    ref = _dense(q, k, v, layout.dense_mask(), scale)
    assert torch.allclose(out[:real], ref[:real], rtol=0, atol=1e-12)   # the tail's rows are read by no loss
    (call,) = core.calls
    assert call["shape"] == (layout.length, HEADS, DIM)                  # THD: the batch dim squeezed
    borders = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert thd_segments(layout) == borders + ([layout.length] if layout.length > real else [])


def test_plain_and_refused_layouts():
    scale = 1 / math.sqrt(DIM)
    core = te_layout_core_attention(ReferenceTHD)(scale)
    # a padded batch ("none"): TE's own causal sbhd path, no params
    plain = AttentionLayout.plain(2, 6)
    q, k, v = _qkv(6, batch=2, seed=1)
    out = core(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=LayoutParams(layout=plain))
    assert core.calls[-1]["params"] is None and out.shape == (6, 2, HEADS * DIM)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    for b in range(2):
        assert torch.allclose(out[:, b:b + 1], _dense(q[:, b:b + 1], k[:, b:b + 1], v[:, b:b + 1], causal, scale),
                              atol=1e-12)
    # other packed_seq_params pass through untouched
    thd = thd_params(AttentionLayout.packed_sequences([2, 4]), "cpu")
    core(q[:, 0], k[:, 0], v[:, 0], None, attn_mask_type=AttnMaskType.causal, packed_seq_params=thd)
    assert core.calls[-1]["params"] is thd and isinstance(thd, PackedSeqParams)
    groups = AttentionLayout.shared_prompt_groups([(4, [2, 3])])
    q, k, v = _qkv(groups.length)
    with pytest.raises(NotImplementedError, match="no mask for responses that share a prompt"):
        core(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=LayoutParams(layout=groups))
    seqs = AttentionLayout.packed_sequences([3, 3])
    q, k, v = _qkv(seqs.length)
    with pytest.raises(ValueError, match="attention_mask=None"):
        core(q, k, v, torch.ones(1), attn_mask_type=AttnMaskType.causal, packed_seq_params=LayoutParams(layout=seqs))
    core.config.context_parallel_size = 2
    with pytest.raises(NotImplementedError, match="context parallelism"):
        core(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=LayoutParams(layout=seqs))
