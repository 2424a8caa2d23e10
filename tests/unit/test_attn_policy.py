"""attention_policy (chunked, recomputing backward) against explicit materialised references.

Independent reference: transformers' Qwen2 ``eager_attention_forward`` (its repeat_kv GQA mapping, scaling
and softmax) for every head of one sample, then the head mean, own position dropped, renormalised,
written out here row by row.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

from megatron_ral.attention import (
    ChunkConfig,
    RowLayout,
    attention_policy,
    attention_policy_reference,
    gather_rows,
    jsd,
    response_row_layout,
    segment_ids_from_cu_seqlens,
)


class _Module(torch.nn.Module):
    def __init__(self, n_rep: int) -> None:
        super().__init__()
        self.num_key_value_groups = n_rep
        self.eval()


def hf_policy_one_sample(q: torch.Tensor, k: torch.Tensor, positions: list[int], scale: float) -> torch.Tensor:
    """q [R, H, d], k [n, Hkv, d] of one sample (keys 0..n-1, all real) -> p [R, n] via HF eager attention."""
    n_rep = q.shape[1] // k.shape[1]
    pos = torch.tensor(positions)
    keys = torch.arange(k.shape[0])
    mask = torch.where(keys[None, :] <= pos[:, None], 0.0, float("-inf")).to(q.dtype)[None, None]
    value = torch.zeros_like(k).permute(1, 0, 2)[None]
    _, w = eager_attention_forward(_Module(n_rep), q.permute(1, 0, 2)[None], k.permute(1, 0, 2)[None], value,
                                   mask, scaling=scale)
    mean = w[0].mean(dim=0)  # [R, n]
    rows = []
    for r, t in enumerate(positions):
        kept = mean[r, :t]
        rows.append(torch.cat([kept / kept.sum(), torch.zeros(k.shape[0] - t, dtype=q.dtype)]))
    return torch.stack(rows)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _amax(x: torch.Tensor) -> float:
    return float(x.detach().abs().max()) if x.numel() else 0.0


def _inputs(t, b, h, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, b, h, d, generator=g, dtype=dtype) * 1.5
    k = torch.randn(t, b, hkv, d, generator=g, dtype=dtype) * 1.5
    return q, k


# HF's eager softmax always runs in float32, so float64 agrees only to float32 precision here.
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_forward_matches_hf_eager_attention(dtype, tol):
    t, h, hkv, d = 23, 6, 2, 8
    q, k = _inputs(t, 1, h, hkv, d, dtype)
    layout = response_row_layout([9], [t])
    rows = gather_rows(q, layout)
    p = attention_policy(rows, k, layout, chunk=ChunkConfig(max_rows=5, heads_per_chunk=2))  # GQA group of 3: blocks 2+1
    ref = hf_policy_one_sample(rows[:, 0], k[:, 0], layout.row_index[0].tolist(), 1 / math.sqrt(d))
    assert p.dtype == dtype and p.shape == (1, t - 9, t)
    assert _rel(p[0], ref) < tol
    assert torch.allclose(p.sum(-1), torch.ones((), dtype=dtype), atol=10 * tol)


def _padded_case(dtype):
    # Right-padded batch of three samples, different prompt/response lengths, plus custom scale.
    t, h, hkv, d = 19, 4, 2, 8
    q, k = _inputs(t, 3, h, hkv, d, dtype, seed=1)
    layout = response_row_layout([5, 8, 2], [19, 13, 9])
    return q, k, layout


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
def test_forward_and_gradients_match_materialised_reference(dtype, tol):
    q, k, layout = _padded_case(dtype)
    q_rows = gather_rows(q, layout).detach().requires_grad_()
    k = k.clone().requires_grad_()
    target = torch.softmax(torch.randn(3, layout.num_rows, k.shape[0], dtype=dtype), -1)

    def loss_of(p):  # a JSD loss on the rows plus a generic linear term
        w = torch.linspace(-1, 1, p.numel(), dtype=dtype).view_as(p)
        return jsd(p, target, mask=p > 0).sum() + (p * w).sum()

    p = attention_policy(q_rows, k, layout, softmax_scale=0.3, chunk=ChunkConfig(max_rows=3))
    gq, gk = torch.autograd.grad(loss_of(p), (q_rows, k))
    pr = attention_policy_reference(q_rows, k, layout, softmax_scale=0.3)
    rq, rk = torch.autograd.grad(loss_of(pr), (q_rows, k))
    assert _rel(p, pr) < tol
    assert _rel(gq, rq) < tol
    assert _rel(gk, rk) < tol
    assert gq.dtype == dtype and gk.dtype == dtype


def test_reference_matches_hf_per_sample():
    q, k, layout = _padded_case(torch.float64)
    pr = attention_policy_reference(gather_rows(q, layout), k, layout)
    for b, (pl, n) in enumerate([(5, 19), (8, 13), (2, 9)]):
        ref = hf_policy_one_sample(q[pl:n, b], k[:n, b], list(range(pl, n)), 1 / math.sqrt(q.shape[-1]))
        assert _rel(pr[b, : n - pl, :n], ref) < 1e-6  # HF softmax runs in float32
        assert _amax(pr[b, n - pl:]) == 0.0
        assert _amax(pr[b, :, n:]) == 0.0


def test_gradcheck_float64():
    t, h, hkv, d = 9, 4, 2, 3
    q, k = _inputs(t, 2, h, hkv, d, torch.float64, seed=2)
    layout = response_row_layout([3, 5], [9, 8])
    q_rows = gather_rows(q, layout).detach().requires_grad_()
    k = k.clone().requires_grad_()
    w = torch.randn(2, layout.num_rows, t, dtype=torch.float64)

    def f(qq, kk):
        return (attention_policy(qq, kk, layout, chunk=ChunkConfig(max_rows=2)) * w).sum()

    assert torch.autograd.gradcheck(f, (q_rows, k), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_padded_batch_equals_per_sample():
    q, k, layout = _padded_case(torch.float64)
    q_rows = gather_rows(q, layout).detach().requires_grad_()
    k = k.clone().requires_grad_()
    w = torch.randn(3, layout.num_rows, k.shape[0], dtype=torch.float64)
    p = attention_policy(q_rows, k, layout, chunk=ChunkConfig(max_rows=4))
    gq, gk = torch.autograd.grad((p * w).sum(), (q_rows, k))
    for b, (pl, n) in enumerate([(5, 19), (8, 13), (2, 9)]):
        qs = q[pl:n, b : b + 1].clone().requires_grad_()
        ks = k.detach()[:n, b : b + 1].clone().requires_grad_()
        lay = response_row_layout([pl], [n])
        ps = attention_policy(qs, ks, lay)
        sq, sk = torch.autograd.grad((ps * w[b : b + 1, : n - pl, :n]).sum(), (qs, ks))
        assert torch.allclose(p[b, : n - pl, :n], ps[0], rtol=0, atol=1e-13)
        assert torch.allclose(gq[: n - pl, b], sq[:, 0], rtol=0, atol=1e-12)
        assert torch.allclose(gk[:n, b], sk[:, 0], rtol=0, atol=1e-12)
        assert _amax(gk[n:, b]) == 0.0  # padding keys get no gradient
        assert _amax(gq[n - pl:, b]) == 0.0  # padding rows get no gradient


def test_left_padding_via_key_valid():
    # Sample 1 is left-padded by 4 keys: same result as the unpadded sample.
    t, h, hkv, d = 14, 4, 1, 5
    q, k = _inputs(t, 2, h, hkv, d, torch.float64, seed=3)
    key_valid = torch.ones(2, t, dtype=torch.bool)
    key_valid[1, :4] = False
    layout = RowLayout(row_index=torch.tensor([[10, 11, 12, 13]] * 2), key_valid=key_valid)
    p = attention_policy(gather_rows(q, layout), k, layout)
    solo = attention_policy(q[4:, 1:2][6:], k[4:, 1:2], RowLayout(row_index=torch.tensor([[6, 7, 8, 9]])))
    assert torch.allclose(p[1, :, 4:], solo[0], atol=1e-14)
    assert float(p[1, :, :4].abs().max()) == 0.0


def test_packed_sequences_equal_per_sample():
    # Three samples packed into one stream with 2 tokens of tail padding.
    lens, prompts = [9, 6, 11], [4, 2, 7]
    cu = torch.tensor([0, 9, 15, 26])
    total = 28
    h, hkv, d = 4, 2, 6
    q, k = _inputs(total, 1, h, hkv, d, torch.float64, seed=4)
    seg = segment_ids_from_cu_seqlens(cu, total)
    assert seg.tolist() == [0] * 9 + [1] * 6 + [2] * 11 + [-1] * 2
    rows = [int(cu[i]) + j for i in range(3) for j in range(prompts[i], lens[i])]
    layout = RowLayout(row_index=torch.tensor([rows]), key_valid=(seg >= 0)[None], segment_ids=seg[None])
    q_rows = gather_rows(q, layout).detach().requires_grad_()
    kk = k.clone().requires_grad_()
    w = torch.randn(1, len(rows), total, dtype=torch.float64)
    p = attention_policy(q_rows, kk, layout, chunk=ChunkConfig(max_rows=3))
    gq, gk = torch.autograd.grad((p * w).sum(), (q_rows, kk))
    r0 = 0
    for i in range(3):
        s, n, pl = int(cu[i]), lens[i], prompts[i]
        qs = q[s + pl : s + n].clone().requires_grad_()
        ks = k[s : s + n].clone().requires_grad_()
        ps = attention_policy(qs, ks, response_row_layout([pl], [n]))
        nr = n - pl
        sq, sk = torch.autograd.grad((ps * w[:, r0 : r0 + nr, s : s + n]).sum(), (qs, ks))
        assert torch.allclose(p[0, r0 : r0 + nr, s : s + n], ps[0], atol=1e-14)
        outside = torch.ones(total, dtype=torch.bool)
        outside[s : s + n] = False
        assert _amax(p[0, r0 : r0 + nr, outside]) == 0.0
        assert torch.allclose(gq[r0 : r0 + nr], sq, atol=1e-12)
        r0 += nr
    # Each key's gradient gets contributions from its own sample's rows only: compare per segment.
    for i in range(3):
        s, n, pl = int(cu[i]), lens[i], prompts[i]
        qs = q[s + pl : s + n]
        ks = k[s : s + n].clone().requires_grad_()
        ri = sum(lens[j] - prompts[j] for j in range(i))
        ps = attention_policy(qs, ks, response_row_layout([pl], [n]))
        (sk,) = torch.autograd.grad((ps * w[:, ri : ri + n - pl, s : s + n]).sum(), (ks,))
        assert torch.allclose(gk[s : s + n], sk, atol=1e-12)
    assert _amax(gk[26:]) == 0.0


def test_chunking_does_not_change_results():
    q, k, layout = _padded_case(torch.float64)
    q_rows = gather_rows(q, layout).detach().requires_grad_()
    k = k.clone().requires_grad_()
    w = torch.randn(3, layout.num_rows, k.shape[0], dtype=torch.float64)
    outs = []
    chunks = (ChunkConfig(max_rows=1), ChunkConfig(max_rows=5), ChunkConfig(workspace_bytes=1),
              ChunkConfig(heads_per_chunk=2), ChunkConfig(heads_per_chunk=5, max_rows=2))
    for chunk in chunks:
        p = attention_policy(q_rows, k, layout, chunk=chunk)
        outs.append((p, *torch.autograd.grad((p * w).sum(), (q_rows, k))))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.allclose(a, b, atol=1e-14)


def test_bf16_inputs_compute_in_fp32():
    q, k, layout = _padded_case(torch.float32)
    qb, kb = gather_rows(q, layout).bfloat16().requires_grad_(), k.bfloat16().requires_grad_()
    p = attention_policy(qb, kb, layout)
    assert p.dtype == torch.float32
    ref = attention_policy_reference(qb.float(), kb.float(), layout)
    assert _rel(p, ref) < 1e-5
    gq, gk = torch.autograd.grad(p.square().sum(), (qb, kb))
    assert gq.dtype == torch.bfloat16 and gk.dtype == torch.bfloat16


def test_first_token_row_without_keys_is_zero_and_grad_finite():
    # A row at key index 0 has only itself in the softmax: its policy is empty (all zero), no NaN.
    q, k = _inputs(5, 1, 2, 1, 4, torch.float64)
    layout = RowLayout(row_index=torch.tensor([[0, 3]]))
    q_rows = gather_rows(q, layout).detach().requires_grad_()
    p = attention_policy(q_rows, k, layout)
    assert _amax(p[0, 0]) == 0.0 and abs(float(p[0, 1].detach().sum()) - 1) < 1e-14
    (g,) = torch.autograd.grad(p.square().sum(), (q_rows,))
    assert torch.isfinite(g).all() and float(g[0].abs().sum()) == 0.0


def test_saved_tensors_never_hold_per_head_probabilities():
    t, h, hkv, d = 40, 8, 2, 4
    q, k = _inputs(t, 1, h, hkv, d, torch.float32)
    layout = response_row_layout([10], [t])
    q_rows = gather_rows(q, layout).detach().requires_grad_()
    k = k.clone().requires_grad_()
    r = layout.num_rows

    def saved_bytes(fn):
        sizes = []

        def pack(x):
            sizes.append(x.numel() * x.element_size())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn(q_rows, k, layout)
        return sizes

    ours = saved_bytes(attention_policy)
    eager = saved_bytes(attention_policy_reference)
    one_rt = r * t * 4
    inputs = q_rows.numel() * 4 + k.numel() * 4
    assert sum(ours) <= inputs + one_rt + h * r * 4 + r * 4  # q, k, p, log-sum-exp, norm
    assert max(eager) >= h * r * t * 4  # the reference does hold H x R x T


def test_require_grad_and_no_grad():
    q, k, layout = _padded_case(torch.float32)
    q_rows = gather_rows(q, layout).requires_grad_()
    with torch.no_grad():
        p = attention_policy(q_rows, k, layout)
        assert not p.requires_grad
        with pytest.raises(RuntimeError, match="selective core-attention recompute"):
            attention_policy(q_rows, k, layout, require_grad=True)


def test_shape_errors_are_clear():
    q, k, layout = _padded_case(torch.float32)
    q_rows = gather_rows(q, layout)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention_policy(q_rows[:, :, :3], k, layout)
    with pytest.raises(ValueError, match=r"\[R, B, H, d\]"):
        attention_policy(q_rows[0], k, layout)
    bad = RowLayout(row_index=layout.row_index + 100, row_valid=layout.row_valid, key_valid=layout.key_valid)
    with pytest.raises(ValueError, match="row_index values"):
        attention_policy(q_rows, k, bad)
