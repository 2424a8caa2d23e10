"""The local core attention at CP=2 (two gloo ranks, megatron's load-balanced split) equals CP=1 on the
whole stream: outputs, and the gradients of Q, K and V on the rank that owns each token (K/V are
all-gathered; their gradients come back by reduce-scatter). Plain causal input (b=2, 13 real tokens padded
to 16 = a multiple of 2C), packed ``sequences`` of odd lengths and shared-prompt ``groups``; query blocks
that straddle sequences and chunk boundaries. Also: megatron-core's M-RoPE slicing per CP rank (which
builds a pinned tensor, stripped on CPU) picks the same tokens as the layout's split."""

from __future__ import annotations

import pytest
import torch

from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

HEADS, GROUPS, DIM = 4, 2, 8


def _layouts():
    from megatron_ral.models.qwen25vl.attention_layout import AttentionLayout

    return {
        "plain": (None, 2, 16),  # 13 real tokens, right-padded to 16
        "sequences": (AttentionLayout.packed_sequences([5, 1, 7, 3, 3], pad_to_multiple=4), 1, 20),
        "groups": (AttentionLayout.shared_prompt_groups([(5, [3, 1]), (2, [4, 2])], pad_to_multiple=4), 1, 20),
    }


def _module(cp: int, block: int):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ral.models.qwen25vl.core_attention import LocalCoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                            num_query_groups=GROUPS, kv_channels=DIM, attention_dropout=0.0,
                            params_dtype=torch.float64, use_cpu_initialization=True, masked_softmax_fusion=False,
                            context_parallel_size=cp)
    return LocalCoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                              query_block=block)


def _rank_fn() -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding

    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.models.qwen25vl.attention_layout import cp_indices
    from megatron_ral.models.qwen25vl.core_attention import LayoutParams
    from megatron_ral.platform import initialize

    initialize(ParallelConfig(context_parallel_size=2), seed=1)
    group = parallel_state.get_context_parallel_group()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    assert size == 2
    out = {}
    for name, (layout, b, length) in _layouts().items():
        idx = cp_indices(length, size, rank)
        gen = torch.Generator().manual_seed(11)
        q = torch.randn(length, b, HEADS, DIM, generator=gen, dtype=torch.float64)
        k = torch.randn(length, b, GROUPS, DIM, generator=gen, dtype=torch.float64)
        v = torch.randn(length, b, GROUPS, DIM, generator=gen, dtype=torch.float64)
        w = torch.randn(length, b, HEADS * DIM, generator=gen, dtype=torch.float64)
        params = None if layout is None else LayoutParams(layout=layout)
        # CP = 1: the whole stream on this rank
        q1, k1, v1 = (t.clone().requires_grad_(True) for t in (q, k, v))
        o1 = _module(1, 512)(q1, k1, v1, None, packed_seq_params=params)
        (o1 * w).sum().backward()
        for block in (3, 512):
            # CP = 2: this rank's two chunks; the loss is the sum of the ranks' parts
            q2, k2, v2 = (t[idx].clone().requires_grad_(True) for t in (q, k, v))
            o2 = _module(2, block)(q2, k2, v2, None, packed_seq_params=params)
            (o2 * w[idx]).sum().backward()
            out[f"{name}/block{block}"] = {
                "out": float((o2 - o1[idx]).detach().abs().max()),
                "dq": float((q2.grad - q1.grad[idx]).abs().max()),
                "dk": float((k2.grad - k1.grad[idx]).abs().max()),
                "dv": float((v2.grad - v1.grad[idx]).abs().max()),
                "scale": min(float(g.abs().max()) for g in (q1.grad, k1.grad, v1.grad)),
            }
    # megatron's M-RoPE table per CP rank: the rows of this rank's global tokens
    layout = _layouts()["sequences"][0]
    rotary = MultimodalRotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000)
    pos = layout.position_ids
    sliced = rotary(pos, [2, 3, 3])
    rotary.cp_group = None  # the unsplit table
    full = rotary(pos, [2, 3, 3])
    out["rope"] = {"diff": float((sliced - full[layout.cp_indices(size, rank)]).abs().max()),
                   "rows": sliced.shape[0], "full_rows": full.shape[0]}
    return out


def test_cp2_equals_cp1():
    results = run_distributed(_rank_fn, 2)
    for res in results:
        rope = res.pop("rope")
        assert rope["rows"] * 2 == rope["full_rows"] and rope["diff"] == 0.0, rope
        assert len(res) == 6
        for key, r in res.items():
            assert r["scale"] > 1e-3, key  # gradients are not trivially zero
            for name in ("out", "dq", "dk", "dv"):
                assert r[name] < 1e-12, (key, name, r)
