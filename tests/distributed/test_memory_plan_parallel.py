"""The memory planner's per-rank parameters, gradient / parameter buffers and optimizer state against megatron-core
itself on gloo, exactly: TP2 x DP2 with the distributed optimizer (fp32 and bf16 parameters: the bf16 run adds
the fp32 main copies), and PP2 with tied embeddings (the shared embedding's own bucket on both stages)."""

from __future__ import annotations

import pytest
import torch

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed


def _optimizer_elements(opt) -> dict:
    """Elements of Adam's moments and of the fp32 main copies of 16-bit parameters on this rank."""
    moments = main = 0
    for o in getattr(opt, "chained_optimizers", [opt]):
        for state in o.optimizer.state.values():
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
            assert state["exp_avg"].numel() == state["exp_avg_sq"].numel()
            moments += state["exp_avg"].numel()
        for group in getattr(o, "shard_fp32_from_float16_groups", None) or []:
            main += sum(p.numel() for p in group if p.dtype == torch.float32)
    return {"moments": moments, "main": main}


def _rank(preset: str, tp: int, pp: int, dtype: str) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_ral.models.qwen25vl import memory as M
    from megatron_ral.models.qwen25vl.provider import build_model
    from megatron_ral.platform import initialize
    from megatron_ral.rl import memory_plan as P
    from megatron_ral.testing.models import tiny_hf_config

    initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=3)
    params_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    cfg = tiny_hf_config(preset)
    model = build_model(cfg, ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                        dtype=params_dtype)
    built = [(n, p.numel(), p.requires_grad) for n, p in model.named_parameters()]
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=True),
        module=model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
                        use_distributed_optimizer=True), [ddp])
    ddp.zero_grad_buffer()
    opt.zero_grad()
    opt.step()  # Adam creates its state at the first step (zero gradients are enough)
    grad = sum(b.grad_data.numel() for b in ddp.buffers)
    assert all(b.grad_data.dtype == torch.float32 for b in ddp.buffers)
    param_buf = sum(b.param_data.numel() * b.param_data.element_size() for b in ddp.buffers)

    shape = M.shape_from_config(cfg.to_dict(), preset)
    stage = ps.get_pipeline_model_parallel_rank()
    planned = M.stage_parameters(shape, tp, pp, stage)
    dp_cp = ps.get_data_parallel_world_size(with_context_parallel=True)
    settings = P.Settings(dtype_bytes=2 if dtype == "bf16" else 4, spec="local")
    mem = P.trainable_memory(planned, settings, dp_cp)
    plan = P.plan_memory(shape, None, P.Layout(tp=tp, pp=pp, dp=dp_cp), P.Workload(frames=4), settings)
    rank = ps.get_data_parallel_rank()
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {
        "built": built, "planned": [(p.name, p.numel, p.trainable) for p in planned],
        "measured": {"grad": grad, "param_bytes": param_buf, **_optimizer_elements(opt)},
        "formula": {"grad": mem.grad_elements, "param_bytes": mem.param_bytes, "moments": mem.moments[rank],
                    "main": mem.main_copies[rank]},
        "frozen_bytes": frozen, "plan_resident": plan.stages[stage].resident, "dp_cp": dp_cp,
        "optimizer_bytes": mem.optimizer_bytes(rank),
    }


def _check(results: list[dict], dtype: str) -> None:
    for r in results:
        assert r["built"] == r["planned"]
        assert r["measured"] == r["formula"]
        assert (r["formula"]["main"] > 0) == (dtype == "bf16")
        res = r["plan_resident"]
        assert res["gradients"] == 4 * r["measured"]["grad"]
        assert res["weights"] == r["measured"]["param_bytes"] + r["frozen_bytes"]
        assert res["optimizer"] >= r["optimizer_bytes"] == 8 * r["measured"]["moments"] + 4 * r["measured"]["main"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tp2_dp2_buffers_and_optimizer_shards(dtype):
    results = run_distributed(_rank, 4, "tiny", 2, 1, dtype)
    _check(results, dtype)
    # the two DP ranks of a TP rank hold the two halves of one buffer (padding excluded)
    assert results[0]["dp_cp"] == 2
    assert 0 < results[0]["measured"]["moments"] + results[2]["measured"]["moments"] <= results[0]["measured"]["grad"]


def test_pp2_tied_embedding_buckets():
    results = run_distributed(_rank, 2, "small", 1, 2, "fp32")
    _check(results, "fp32")
    first, last = (dict((n, k) for n, k, _ in r["planned"]) for r in results)
    assert "language_model.output_layer.weight" in last  # the tied embedding's copy on the last stage
    assert first["language_model.embedding.word_embeddings.weight"] == last["language_model.output_layer.weight"]
