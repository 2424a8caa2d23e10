"""Qwen25VLModel with megatron-core's KV-cache inference context and DDP + distributed optimizer."""

import pytest
import torch

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.models.qwen25vl.model import attention_mask_from_padding
from megatron_ral.models.qwen25vl.rope_index import decode_position_ids
from megatron_ral.testing.models import make_prompt, seeded_megatron_model
from megatron_ral.platform import destroy, initialize


@pytest.fixture(scope="module", autouse=True)
def platform():
    initialize(ParallelConfig(), seed=1234)
    yield
    destroy()  # leave no process group behind for later tests in the session


def _model(preset):
    return seeded_megatron_model(preset, seed=7)


@pytest.mark.parametrize("padding_side", ["none", "left"])
def test_kv_cache_decode_with_rope_delta_matches_full_forward(padding_side):
    """Prefill a video prompt into megatron's static KV cache, then decode token by token with
    positions cache_position + rope delta: each step's logits equal the full-sequence forward."""
    from megatron.core.inference.contexts import StaticInferenceContext

    model = _model("tiny").eval()
    rows = [[3, ("video", (4, 4, 4)), 4, 3]]
    if padding_side == "left":
        rows.append([1, ("video", (2, 4, 4)), 2, 3])
    full = make_prompt(rows, seed=2, second_per_grid_ts=[1.5, 0.5][: len(rows)], padding_side="left")
    n_new = 3
    ids, mask = full.input_ids, full.attention_mask
    plen = ids.shape[1] - n_new
    vision = dict(pixel_values_videos=full.pixel_values_videos, video_grid_thw=full.video_grid_thw)
    with torch.no_grad():
        ref = model(**full.model_inputs(), runtime_gather_output=True)
        pos, delta = model.compute_position_ids(ids[:, :plen], video_grid_thw=full.video_grid_thw,
                                                second_per_grid_ts=full.second_per_grid_ts,
                                                attention_mask=mask[:, :plen])
        ctx = StaticInferenceContext(ids.shape[0], 64)
        out = model(ids[:, :plen], position_ids=pos, attention_mask=mask[:, :plen], inference_context=ctx,
                    runtime_gather_output=True, **vision)
        steps = [out[:, -1]]
        ctx.sequence_len_offset += plen
        for j in range(n_new - 1):
            pos = torch.cat([pos, decode_position_ids(mask[:, :plen].sum(1) + j, delta, 1)], dim=2)
            step_mask = mask[:, : plen + j + 1]
            m4 = attention_mask_from_padding(step_mask)
            if m4 is not None:
                m4 = m4[:, :, -1:, :]  # the new query row against every cached key
            out = model(ids[:, plen + j: plen + j + 1], position_ids=pos, attention_mask=m4,
                        inference_context=ctx, runtime_gather_output=True)
            steps.append(out[:, -1])
            ctx.sequence_len_offset += 1
    for j, got in enumerate(steps):
        torch.testing.assert_close(got, ref[:, plen - 1 + j], rtol=1e-4, atol=1e-4)


def test_ddp_distributed_optimizer_step_trains_lm_only():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = _model("small")
    vision_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    lm_before = {k: v.clone() for k, v in model.language_model.state_dict().items() if v is not None}
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True), [ddp])
    prompt = make_prompt([[3, ("image", (1, 4, 4)), 5]], seed=3)
    labels = torch.roll(prompt.input_ids, -1, 1)
    losses = []
    for _ in range(3):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(**prompt.model_inputs(), labels=labels).mean()
        loss.backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
        assert ok
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in model.vision_model.state_dict().items():
        assert torch.equal(v, vision_before[k]), k
    changed = [k for k, v in model.language_model.state_dict().items()
               if k in lm_before and torch.is_tensor(v) and not torch.equal(v, lm_before[k])]
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in changed
    assert "embedding.word_embeddings.weight" in changed
