"""HF <-> Megatron tensor layouts on hand-built tensors (every row checked against its formula)."""

import pytest
import torch

from megatron_ral.models.qwen25vl import mapping as M
from megatron_ral.models.qwen25vl.arch import Qwen25VLArch, UnsupportedCheckpointError, arch_from_config


def _labelled(rows: int, base: int, cols: int | None) -> torch.Tensor:
    """Row r holds base + r (in every column): the origin of each row stays visible after any reordering."""
    t = base + torch.arange(rows, dtype=torch.float64)
    return t if cols is None else t[:, None].expand(rows, cols).clone()


@pytest.mark.parametrize("heads,groups", [(4, 2), (8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("cols", [3, None], ids=["weight", "bias"])
def test_qkv_interleave_index_by_index(heads, groups, cols):
    d = 2
    q = _labelled(heads * d, 1000, cols)
    k = _labelled(groups * d, 2000, cols)
    v = _labelled(groups * d, 3000, cols)
    qkv = M.qkv_to_megatron(q, k, v, groups)
    h = heads // groups
    assert qkv.shape[0] == (heads + 2 * groups) * d
    for r in range(qkv.shape[0]):
        g, j = divmod(r, (h + 2) * d)
        if j < h * d:  # query head g*h + j//d, row j%d  -> q row (g*h)*d + j
            expected = 1000 + g * h * d + j
        elif j < h * d + d:
            expected = 2000 + g * d + (j - h * d)
        else:
            expected = 3000 + g * d + (j - h * d - d)
        row = qkv[r] if cols is None else qkv[r, 0]
        assert row.item() == expected, (r, g, j)
    q2, k2, v2 = M.qkv_from_megatron(qkv, heads, groups, d)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_qkv_matches_megatron_attention_split():
    """megatron's SelfAttention splits linear_qkv output as view(..., groups, (h+2)*d) then [h*d, d, d]."""
    heads, groups, d, hidden = 4, 2, 3, 5
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n * d, hidden, generator=g) for n in (heads, groups, groups))
    x = torch.randn(7, hidden, generator=g)
    mixed = x @ M.qkv_to_megatron(q, k, v, groups).T  # (tokens, rows)
    mixed = mixed.view(7, groups, (heads // groups + 2) * d)
    mq, mk, mv = torch.split(mixed, [heads // groups * d, d, d], dim=-1)
    torch.testing.assert_close(mq.reshape(7, heads * d), x @ q.T)
    torch.testing.assert_close(mk.reshape(7, groups * d), x @ k.T)
    torch.testing.assert_close(mv.reshape(7, groups * d), x @ v.T)


def test_fc1_is_gate_then_up():
    gate, up = _labelled(4, 100, 3), _labelled(4, 200, 3)
    fc1 = M.fc1_to_megatron(gate, up)
    assert fc1[:, 0].tolist() == [100, 101, 102, 103, 200, 201, 202, 203]
    g2, u2 = M.fc1_from_megatron(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_qkv_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        M.qkv_to_megatron(torch.zeros(8, 4), torch.zeros(4, 4), torch.zeros(2, 4), 2)
    with pytest.raises(ValueError):
        M.qkv_to_megatron(torch.zeros(8, 4), torch.zeros(4, 4, dtype=torch.bfloat16), torch.zeros(4, 4), 2)
    with pytest.raises(ValueError, match="rows"):
        M.qkv_from_megatron(torch.zeros(10, 4), 4, 2, 2)


def test_canonical_names():
    assert M.canonical_hf_name("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert M.canonical_hf_name("model.visual.blocks.0.attn.qkv.bias") == "visual.blocks.0.attn.qkv.bias"
    assert M.canonical_hf_name("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert M.canonical_hf_name("lm_head.weight") == "lm_head.weight"
    assert M.vision_megatron_key("visual.merger.mlp.0.weight") == "vision_model.merger.mlp.0.weight"
    assert M.vision_hf_name("vision_model.blocks.1.norm1.weight") == "visual.blocks.1.norm1.weight"


def _arch(tied: bool) -> Qwen25VLArch:
    return Qwen25VLArch(num_layers=2, hidden_size=8, ffn_hidden_size=12, num_attention_heads=4, num_query_groups=2,
                        head_dim=2, vocab_size=16, tie_word_embeddings=tied, vision_depth=3)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_name_list(tied):
    names = M.hf_names(_arch(tied))
    assert len(names) == len(set(names))
    assert ("lm_head.weight" in names) is (not tied)
    assert len([n for n in names if n.startswith("model.layers.")]) == 2 * 12
    assert len([n for n in names if n.startswith("visual.blocks.")]) == 3 * 12
    shapes = M.hf_lm_shapes(_arch(tied))
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (4, 8)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (8, 8)
    assert M.megatron_layer_shapes(_arch(tied))[M.QKV_W] == ((4 + 2 * 2) * 2, 8)
    assert M.megatron_layer_shapes(_arch(tied))[M.FC1_W] == (24, 8)


def test_arch_from_nested_and_flat_configs():
    nested = {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
              "tie_word_embeddings": True, "vision_config": {"depth": 32},
              "text_config": {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 2,
                              "num_hidden_layers": 36, "intermediate_size": 11008, "vocab_size": 151936}}
    flat = {"model_type": "qwen2_5_vl", "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
            "num_hidden_layers": 28, "intermediate_size": 18944, "vocab_size": 152064,
            "vision_config": {"depth": 32}}
    a, b = arch_from_config(nested), arch_from_config(flat)
    assert (a.head_dim, a.qkv_rows, a.tie_word_embeddings) == (128, (16 + 4) * 128, True)
    assert (b.head_dim, b.heads_per_group, b.tie_word_embeddings) == (128, 7, False)


def test_unsupported_architecture_is_one_clear_error():
    with pytest.raises(UnsupportedCheckpointError, match="unsupported architecture.*llama.*Qwen2.5-VL"):
        arch_from_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
