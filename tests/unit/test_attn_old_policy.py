"""Old-policy stores: Q/K recompute is exact, stored rows round as their dtype, sizes as documented."""

from __future__ import annotations

import pytest
import torch

from megatron_ral.attention import (
    CapturedQK,
    OldPolicyConfig,
    attention_policy,
    gather_rows,
    jsd,
    make_old_policy_store,
    response_row_layout,
)
from megatron_ral.attention.old_policy import QKStore, RowStore, stored_values_per_sample


def _capture(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(30, 2, 8, 16, generator=g).to(dtype)
    k = torch.randn(30, 2, 2, 16, generator=g).to(dtype)
    layout = response_row_layout([10, 14], [30, 26])
    return CapturedQK(gather_rows(q, layout), k, layout, softmax_scale=0.2)


def test_qk_store_recomputes_exactly():
    cap = _capture(torch.bfloat16)
    store = make_old_policy_store(OldPolicyConfig())
    assert isinstance(store, QKStore)
    with torch.no_grad():
        store.put("mb0", cap)
    p = attention_policy(cap.q, cap.k, cap.layout, cap.softmax_scale)
    assert torch.equal(store.get("mb0"), p)  # bit-identical: the first update sees JSD gradient exactly 0
    assert store.nbytes() == (cap.q.numel() + cap.k.numel()) * 2
    assert store.nbytes() == 2 * 2 * stored_values_per_sample("qk", 20, 30, 8, 2, 16)


def test_row_store_bf16_and_fp32():
    cap = _capture()
    p = attention_policy(cap.q, cap.k, cap.layout, cap.softmax_scale)
    store = make_old_policy_store(OldPolicyConfig(mode="rows"))
    assert isinstance(store, RowStore)
    store.put(0, cap)
    got = store.get(0)
    assert got.dtype == torch.float32
    assert float(((got - p).abs() / p.clamp_min(1e-30))[p > 0].max()) <= 2.0**-8
    assert torch.equal(got == 0, p == 0)
    assert store.nbytes() == p.numel() * 2
    assert float(jsd(p, got).max()) < 1e-5
    exact = make_old_policy_store(OldPolicyConfig(mode="rows", dtype="fp32"))
    exact.put(0, cap)
    assert torch.equal(exact.get(0), p)


def test_offload_to_host_and_lifecycle():
    cap = _capture()
    store = make_old_policy_store(OldPolicyConfig(mode="qk", offload=True))
    store.put(("step", 3), cap)
    assert ("step", 3) in store
    assert all(t.device.type == "cpu" for t in store._entries[("step", 3)].tensors.values())
    assert torch.equal(store.get(("step", 3)), attention_policy(cap.q, cap.k, cap.layout, cap.softmax_scale))
    store.pop(("step", 3))
    assert ("step", 3) not in store and store.nbytes() == 0
    store.put(1, cap)
    store.clear()
    assert store.nbytes() == 0


def test_stored_tensors_are_detached_copies():
    cap = _capture()
    q = cap.q.clone().requires_grad_()
    store = make_old_policy_store(OldPolicyConfig(mode="qk"))
    store.put(0, CapturedQK(q, cap.k, cap.layout, cap.softmax_scale))
    before = store.get(0)
    with torch.no_grad():
        q.mul_(3.0)  # the weights (and their Q) move after the old pass
    assert torch.equal(store.get(0), before)
    assert not store.get(0).requires_grad


def test_config_errors():
    with pytest.raises(ValueError, match="old_policy.mode"):
        OldPolicyConfig(mode="logits")
    with pytest.raises(ValueError, match="old_policy.dtype"):
        OldPolicyConfig(dtype="int8")


def test_stored_values_formula():
    # 7B layout, R = 1024, T = 16384, TP = 1 and 4
    assert stored_values_per_sample("rows", 1024, 16384, 28, 4, 128) == 1024 * 16384
    assert stored_values_per_sample("qk", 1024, 16384, 28, 4, 128) == 1024 * 3584 + 16384 * 512
    assert stored_values_per_sample("qk", 1024, 16384, 28, 4, 128, tp=4) == (1024 * 3584 + 16384 * 512) // 4
