"""Heads split over a TP=2 gloo group give the single-process rows and gradients (forward and backward)."""

from __future__ import annotations

import pytest
import torch

from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

H, HKV, D, T = 8, 4, 6, 21


def _inputs():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(T, 2, H, D, generator=g, dtype=torch.float64) * 1.3
    k = torch.randn(T, 2, HKV, D, generator=g, dtype=torch.float64) * 1.3
    return q, k


def _layouts():
    from megatron_ral.attention import RowLayout, response_row_layout, segment_ids_from_cu_seqlens

    padded = response_row_layout([7, 4], [21, 15])
    seg = segment_ids_from_cu_seqlens(torch.tensor([0, 8, 19]), T)
    rows = list(range(3, 8)) + list(range(12, 19))
    packed = RowLayout(row_index=torch.tensor([rows, rows]), key_valid=(seg >= 0).expand(2, T).clone(),
                       segment_ids=seg.expand(2, T).clone())
    return {"padded": padded, "packed": packed}


def _loss(p: torch.Tensor) -> torch.Tensor:
    from megatron_ral.attention import jsd

    g = torch.Generator().manual_seed(9)
    target = torch.softmax(torch.randn(p.shape, generator=g, dtype=p.dtype), -1)
    w = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return jsd(p, target).sum() + (p * w).sum()


def _rank_fn() -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ral.attention import (
        CapturedQK,
        ChunkConfig,
        OldPolicyConfig,
        attention_policy,
        attention_policy_reference,
        gather_rows,
        make_old_policy_store,
    )
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.platform import initialize

    initialize(ParallelConfig(tensor_model_parallel_size=2), seed=1)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    assert dist.get_world_size(group) == 2
    hs = slice(rank * H // 2, (rank + 1) * H // 2)
    ks = slice(rank * HKV // 2, (rank + 1) * HKV // 2)
    q_full, k_full = _inputs()
    out = {}
    for name, layout in _layouts().items():
        rows_full = gather_rows(q_full, layout)
        for impl in ("capture", "reference"):
            def run(q, k, grp):
                if impl == "capture":
                    return attention_policy(q, k, layout, tp_group=grp, chunk=ChunkConfig(max_rows=4))
                return attention_policy_reference(q, k, layout, tp_group=grp)

            # single process: all heads on this rank, no group
            q1 = rows_full.clone().requires_grad_()
            k1 = k_full.clone().requires_grad_()
            p1 = run(q1, k1, None)
            g1q, g1k = torch.autograd.grad(_loss(p1), (q1, k1))
            # TP: this rank's heads only
            q2 = rows_full[:, :, hs].clone().requires_grad_()
            k2 = k_full[:, :, ks].clone().requires_grad_()
            p2 = run(q2, k2, group)
            g2q, g2k = torch.autograd.grad(_loss(p2), (q2, k2))
            out[f"{name}/{impl}"] = {
                "p": float((p2 - p1).detach().abs().max()),
                "dq": float((g2q - g1q[:, :, hs]).abs().max() / g1q.abs().max()),
                "dk": float((g2k - g1k[:, :, ks]).abs().max() / g1k.abs().max()),
                "grad_scale": float(g1q.abs().max()),
            }
        # the Q/K old-policy store recomputes with the group too
        store = make_old_policy_store(OldPolicyConfig(mode="qk"), tp_group=group)
        store.put(0, CapturedQK(rows_full[:, :, hs], k_full[:, :, ks], layout))
        with torch.no_grad():
            single = attention_policy(rows_full, k_full, layout)
        out[f"{name}/store"] = {"p": float((store.get(0) - single).abs().max())}
    return out


def test_tp2_equals_single_process():
    results = run_distributed(_rank_fn, 2)
    for res in results:
        for key, r in res.items():
            assert r["p"] < 1e-14, (key, r)
            if "dq" in r:
                assert r["grad_scale"] > 1e-3, key  # gradients are not trivially zero
                assert r["dq"] < 1e-12, (key, r)
                assert r["dk"] < 1e-12, (key, r)
