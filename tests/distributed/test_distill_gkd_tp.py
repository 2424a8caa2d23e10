"""Vocab-parallel GKD at TP=2 (2 gloo processes, megatron parallel_state) equals the full-vocabulary
computation at TP=1: values, the student's gradient shard by shard, the teacher's top-k + tail."""

from __future__ import annotations

import pytest
import torch

from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

SHAPE = (3, 5)  # 15 response tokens (odd)
V = 24  # vocabulary (divisible by 2): 12 ids per rank
CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.3)]
TOPKS = (3, 13, V)  # below the shard width, above it (the local top-k is the whole shard), the whole vocabulary
TEMPERATURE = 0.7


def _inputs():
    g = torch.Generator().manual_seed(3)
    student = 2.0 * torch.randn(*SHAPE, V, generator=g, dtype=torch.float64)
    teacher = 2.0 * torch.randn(*SHAPE, V, generator=g, dtype=torch.float64)
    weights = torch.randn(*SHAPE, generator=g, dtype=torch.float64)  # a token-weighted loss, like the trainer's
    return student, teacher, weights


def _value_grad(fn, x0, w, *args):
    x = x0.clone().requires_grad_()
    v = fn(x, *args)
    (g,) = torch.autograd.grad((v * w).sum(), x)
    return v.detach(), g


def _rank_fn() -> dict:
    from megatron.core import parallel_state

    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.distill import gkd_divergence, gkd_topk_divergence, teacher_topk
    from megatron_ral.platform import initialize

    initialize(ParallelConfig(tensor_model_parallel_size=2), seed=1)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    shard = slice(rank * V // 2, (rank + 1) * V // 2)
    student, teacher, w = _inputs()
    s_local, t_local = student[..., shard].contiguous(), teacher[..., shard].contiguous()
    out = {}
    for name, beta in CASES:
        v1, g1 = _value_grad(gkd_divergence, student, w, teacher, name, beta, TEMPERATURE)
        v2, g2 = _value_grad(gkd_divergence, s_local, w, t_local, name, beta, TEMPERATURE, group)
        out[f"exact/{name}/{beta}"] = {"value": v2, "dv": float((v2 - v1).abs().max()),
                                       "dg": float((g2 - g1[..., shard]).abs().max()),
                                       "grad_scale": float(g1[..., shard].abs().max())}
        for k in TOPKS:
            top1 = teacher_topk(teacher, k, TEMPERATURE)
            top2 = teacher_topk(t_local, k, TEMPERATURE, group)
            v1, g1 = _value_grad(gkd_topk_divergence, student, w, top1, name, beta, TEMPERATURE)
            v2, g2 = _value_grad(gkd_topk_divergence, s_local, w, top2, name, beta, TEMPERATURE, group)
            out[f"topk{k}/{name}/{beta}"] = {
                "value": v2, "dv": float((v2 - v1).abs().max()),
                "dg": float((g2 - g1[..., shard]).abs().max()),
                "grad_scale": float(g1[..., shard].abs().max()),
                "ids_equal": bool(torch.equal(top1.ids, top2.ids)),
                "dlogprobs": float((top1.logprobs - top2.logprobs).abs().max()),
                "dtail": float((top1.tail_logmass - top2.tail_logmass).nan_to_num(neginf=0.0).abs().max()),
                "tail_inf_equal": bool(torch.equal(torch.isneginf(top1.tail_logmass), torch.isneginf(top2.tail_logmass))),
                "nonneg": bool((v2 >= 0).all()),
            }
    return out


def test_vocab_parallel_gkd_tp2_equals_tp1():
    results = run_distributed(_rank_fn, 2)
    assert len(results[0]) == len(CASES) * (1 + len(TOPKS))
    for key, r in results[0].items():
        r1 = results[1][key]
        assert torch.equal(r["value"], r1["value"]), key  # the loss is replicated on the TP ranks
        for res in (r, r1):
            assert res["dv"] < 1e-13, (key, res)
            assert res["grad_scale"] > 1e-3, key  # each shard's gradient is not trivially zero
            assert res["dg"] < 1e-13, (key, res)
            if key.startswith("topk"):
                assert res["ids_equal"] and res["tail_inf_equal"] and res["nonneg"], (key, res)
                assert res["dlogprobs"] < 1e-13 and res["dtail"] < 1e-13, (key, res)
