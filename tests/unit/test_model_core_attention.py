"""The local core attention (plain, packed ``sequences``, shared-prompt ``groups``) against an explicit
float64 masked softmax whose mask is written here from the sequence lengths alone; the attention layout's
visibility, positions, CP split and scatter/gather."""

import math

import pytest
import torch

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.models.qwen25vl.attention_layout import AttentionLayout, cp_indices
from megatron_ral.platform import destroy, initialize

HEADS, GROUPS, DIM = 4, 2, 8


@pytest.fixture(scope="module", autouse=True)
def platform():
    initialize(ParallelConfig(), seed=0)
    yield
    destroy()


def _config(dtype=torch.float64, heads=HEADS, groups=GROUPS, dim=DIM, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=dim, attention_dropout=0.0, params_dtype=dtype,
                             use_cpu_initialization=True, masked_softmax_fusion=False,
                             attention_softmax_in_fp32=True, **kw)


def _module(cfg, **params):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ral.models.qwen25vl.core_attention import LocalCoreAttention

    return LocalCoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                              **params)


# ---------------------------------------------------------------- reference masks, from lengths only
def sequences_mask(lengths, total):
    """Block-diagonal causal; the tail padding is one more causal block."""
    seg = []
    for i, n in enumerate(lengths):
        seg += [i] * n
    seg += [len(lengths)] * (total - len(seg))
    seg = torch.tensor(seg)
    t = torch.arange(total)
    return (seg[:, None] == seg[None, :]) & (t[None, :] <= t[:, None])


def groups_mask(groups, total):
    """[prompt, r_1..r_G] per group: prompt causal; a response sees its prompt and itself causally."""
    owner = []  # (group, part) part -1 = prompt, j = response j; padding = (-1, -1)
    for g, (p, responses) in enumerate(groups):
        owner += [(g, -1)] * p
        for j, r in enumerate(responses):
            owner += [(g, j)] * r
    owner += [(-1, -1)] * (total - len(owner))
    mask = torch.zeros(total, total, dtype=torch.bool)
    for t, (gt, pt) in enumerate(owner):
        for j, (gj, pj) in enumerate(owner):
            if gt != gj:
                continue
            if gt == -1:
                mask[t, j] = j <= t  # padding: causal among itself
            elif pj == -1:
                mask[t, j] = pt != -1 or j <= t  # the prompt: whole for responses, causal for the prompt
            else:
                mask[t, j] = pj == pt and j <= t
    return mask


def reference_attention(q, k, v, mask, scale):
    """q [s, b, h, d], k/v [s, b, g, d], mask bool [s, s] (True = visible) -> [s, b, h*d], float64."""
    s, b, h, d = q.shape
    rep = h // k.shape[2]
    kk, vv = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, kk) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhst,tbhd->sbhd", p, vv).reshape(s, b, h * d)


CASES = {
    "sequences": lambda: (AttentionLayout.packed_sequences([5, 1, 7, 3], pad_to_multiple=4),
                          sequences_mask([5, 1, 7, 3], 16)),
    "groups": lambda: (AttentionLayout.shared_prompt_groups([(4, [3, 1, 5]), (3, [2, 2])], pad_to_multiple=4),
                       groups_mask([(4, [3, 1, 5]), (3, [2, 2])], 20)),
    "none": lambda: (AttentionLayout.plain(2, 11), torch.ones(11, 11, dtype=torch.bool).tril()),
}


@pytest.mark.parametrize("block", [3, 512])
@pytest.mark.parametrize("case", list(CASES))
def test_module_equals_float64_masked_softmax(case, block):
    from megatron_ral.models.qwen25vl.core_attention import LayoutParams

    layout, mask = CASES[case]()
    assert torch.equal(layout.dense_mask(), mask)  # the layout's rule is the one written from lengths
    gen = torch.Generator().manual_seed(3)
    s, b = layout.length, layout.batch_size
    q = torch.randn(s, b, HEADS, DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(s, b, GROUPS, DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(s, b, GROUPS, DIM, generator=gen, dtype=torch.float64)
    w = torch.randn(s, b, HEADS * DIM, generator=gen, dtype=torch.float64)
    mod = _module(_config(), query_block=block)
    results = []
    for run in ("module", "reference"):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        if run == "module":
            out = mod(qq, kk, vv, None, packed_seq_params=LayoutParams(layout=layout))
        else:
            out = reference_attention(qq, kk, vv, mask, 1.0 / math.sqrt(DIM))
        (out * w).sum().backward()
        results.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for got, want in zip(*results):
        assert want.abs().max() > 1e-3  # gradients are not trivially zero
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_response_does_not_see_another_response():
    """Changing a response's values changes no other response's output (nor its prompt's)."""
    from megatron_ral.models.qwen25vl.core_attention import LayoutParams

    layout = AttentionLayout.shared_prompt_groups([(3, [4, 2])])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, 1, h, DIM, generator=gen, dtype=torch.float64) for h in (HEADS, GROUPS, GROUPS))
    mod = _module(_config(), query_block=2)
    base = mod(q, k, v, None, packed_seq_params=LayoutParams(layout=layout))
    v2 = v.clone()
    v2[3:7] += 1.0  # the first response
    other = mod(q, k, v2, None, packed_seq_params=LayoutParams(layout=layout))
    assert torch.equal(base[:3], other[:3]) and torch.equal(base[7:], other[7:])
    assert not torch.allclose(base[3:7], other[3:7])


def test_masked_path_keeps_no_mask_or_scores_for_backward():
    """Between forward and backward only Q, K and V are held (each masked block is recomputed in backward),
    plus, where the log-sum-exp parts run (CPU), the output and its log-sum-exp: O(tokens), never a mask or
    scores of O(tokens x keys)."""
    from megatron_ral.models.qwen25vl.core_attention import LayoutParams, lse_parts_available

    layout = AttentionLayout.shared_prompt_groups([(40, [9, 7, 8])], pad_to_multiple=8)
    s = layout.length
    q = torch.randn(s, 1, HEADS, DIM, dtype=torch.float64, requires_grad=True)
    k = torch.randn(s, 1, GROUPS, DIM, dtype=torch.float64, requires_grad=True)
    v = torch.randn(s, 1, GROUPS, DIM, dtype=torch.float64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _module(_config(), query_block=16)(q, k, v, None, packed_seq_params=LayoutParams(layout=layout))
    held = [q.numel(), k.numel(), v.numel()]
    if lse_parts_available("cpu"):
        held += [q.numel(), q.numel() // DIM]  # output [1, h, s, d] and log-sum-exp [1, h, s]
    assert sorted(saved) == sorted(held)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None


@pytest.mark.parametrize("case", ["causal", "padding_mask"])
def test_plain_input_is_megatrons_dot_product_attention(case):
    """No layout: the same function and gradients as megatron-core's module (the SDPA path)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    cfg = _config()
    ref = DotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    mod = _module(cfg)
    assert set(ref.state_dict()) == set(mod.state_dict())
    gen = torch.Generator().manual_seed(1)
    s, b = 9, 2
    q = torch.randn(s, b, HEADS, DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(s, b, GROUPS, DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(s, b, GROUPS, DIM, generator=gen, dtype=torch.float64)
    mask = None
    if case == "padding_mask":
        pad = torch.zeros(b, s, dtype=torch.bool)
        pad[1, :3] = True
        mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None] | pad[:, None, None, :]
    outs = []
    for m in (ref, mod):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = m(qq, kk, vv, mask)
        out.square().sum().backward()
        outs.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_refusals():
    from megatron_ral.models.qwen25vl.core_attention import LayoutParams
    from megatron.core.packed_seq_params import PackedSeqParams

    mod = _module(_config())
    q = torch.zeros(4, 1, HEADS, DIM, dtype=torch.float64)
    kv = torch.zeros(4, 1, GROUPS, DIM, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="Transformer Engine"):
        mod(q, kv, kv, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    layout = AttentionLayout.packed_sequences([2, 2])
    with pytest.raises(ValueError, match="attention_mask=None"):
        mod(q, kv, kv, torch.zeros(1, 1, 4, 4, dtype=torch.bool), packed_seq_params=LayoutParams(layout=layout))
    with pytest.raises(ValueError, match="b=1 rows of 5 tokens"):
        mod(q, kv, kv, None, packed_seq_params=LayoutParams(layout=AttentionLayout.packed_sequences([2, 3])))


# ---------------------------------------------------------------- the layout object
def test_layout_positions_scatter_gather():
    # groups: responses continue from the prompt's positions; the prompt is stored once
    rows = [torch.tensor([[0, 1, 2, 2, 2, 5, 6]] * 3), torch.tensor([[0, 1, 2, 2, 2, 5]] * 3)]
    rows[0][1:, 2:5] = torch.tensor([[0, 1, 1], [0, 0, 1]])  # an image's (h, w) positions in the prompt
    rows[1][1:, 2:5] = torch.tensor([[0, 1, 1], [0, 0, 1]])
    layout = AttentionLayout.shared_prompt_groups([(5, [2, 1])], position_ids=rows, pad_to_multiple=4)
    assert layout.length == 8 and layout.num_tokens == 8
    assert layout.position_ids.shape == (3, 1, 8)
    assert layout.position_ids[0, 0].tolist() == [0, 1, 2, 2, 2, 5, 6, 5]
    back = layout.gather(layout.position_ids.permute(1, 0, 2), dim=1)
    assert [torch.equal(a, b) for a, b in zip(back, rows)] == [True, True]
    bad = [rows[0], rows[1].clone()]
    bad[1][0, 1] = 7
    with pytest.raises(ValueError, match="share their prompt's position ids"):
        AttentionLayout.shared_prompt_groups([(5, [2, 1])], position_ids=bad)
    # sequences: each keeps its own positions; tail padded
    packed = AttentionLayout.packed_sequences([3, 2], pad_to_multiple=4)
    assert packed.position_ids[0, 0].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    ids = [torch.tensor([7, 8, 9]), torch.tensor([4, 5])]
    stream = packed.scatter(ids, pad_value=-1)
    assert stream.tolist() == [[7, 8, 9, 4, 5, -1, -1, -1]]
    assert [t.tolist() for t in packed.gather(stream)] == [[7, 8, 9], [4, 5]]
    # none: rows right-padded
    plain = AttentionLayout.plain(2, 4, lengths=[4, 2])
    rows2 = plain.scatter([torch.tensor([1, 2, 3, 4]), ids[1]], pad_value=0)
    assert rows2.tolist() == [[1, 2, 3, 4], [4, 5, 0, 0]]
    assert [t.tolist() for t in plain.gather(rows2)] == [[1, 2, 3, 4], [4, 5]]
    with pytest.raises(ValueError, match="b = 1"):
        AttentionLayout("sequences", 4, 2, packed.spans, packed.sequences, torch.zeros(3, 2, 4, dtype=torch.long))


def test_cp_indices_are_megatrons_load_balanced_split():
    assert cp_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert sorted(torch.cat([cp_indices(12, 3, r) for r in range(3)]).tolist()) == list(range(12))
    with pytest.raises(ValueError, match="multiple of 2 \\* CP = 4"):
        cp_indices(10, 2, 0)
    layout = AttentionLayout.packed_sequences([3, 3], pad_to_multiple=4)
    x = torch.arange(8).view(1, 8)
    assert layout.split_for_cp(x, 1, 2, 1).tolist() == [[2, 3, 4, 5]]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_cpu_response_blocks_run_as_lse_parts_equal_to_the_masked_blocks(dtype, tol):
    """On CPU a response's blocks run as log-sum-exp parts (prompt, earlier tokens, own causal square); the
    same blocks with their masks give the same output and gradients (the float64 test above holds both
    against the dense reference)."""
    import dataclasses

    from megatron_ral.models.qwen25vl.core_attention import _BlockedAttention, query_blocks

    layout = AttentionLayout.shared_prompt_groups([(24, [9, 3, 14]), (11, [5, 6])], pad_to_multiple=8)
    blocks = query_blocks(layout, 1, 0, 4, "cpu")
    parts = [blk.parts for blk in blocks if blk.parts is not None]
    assert len(parts) == sum(-(-r // 4) for r in (9, 3, 14, 5, 6))  # every response block, none else
    seen = {p for ps in parts for p in ps}
    # the third response [36, 50) of the first group: its prompt, its earlier tokens, its own causal square
    assert {(0, 24, False), (36, 40, False), (40, 44, True)} <= seen
    masked = [dataclasses.replace(blk, parts=None) for blk in blocks]
    gen = torch.Generator().manual_seed(5)
    s = layout.length
    q = torch.randn(1, HEADS, s, DIM, generator=gen).to(dtype)
    k = torch.randn(1, GROUPS, s, DIM, generator=gen).to(dtype)
    v = torch.randn(1, GROUPS, s, DIM, generator=gen).to(dtype)
    w = torch.randn(1, HEADS, s, DIM, generator=gen).to(dtype)
    results = []
    for bl in (blocks, masked):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = _BlockedAttention.apply(qq, kk, vv, bl, 1.0 / math.sqrt(DIM))
        (out.float() * w.float()).sum().backward()
        results.append((out.detach().float(), qq.grad.float(), kk.grad.float(), vv.grad.float()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
