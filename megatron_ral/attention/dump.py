"""Attention rows of a given prompt + response on any TP/PP/CP layout (the library side of tools/dump_attention.py).

    rows = capture_rows_forward(model, [batch], [layout])      # last stage: [p of each micro-batch]
    out = dump_attention(model, prompt, response_ids)          # rank 0: {"rows", "prompt_length", "input_ids"}

The forward runs through megatron's pipeline schedule (forward only, no grad), the same path training
uses, with an :class:`~megatron_ral.attention.capture.AttentionCapture` around each micro-batch's model
call. The rows live on the last pipeline stage; :func:`rows_to_rank0` sends them to global rank 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ral.attention.capture import AttentionCapture, CaptureConfig, response_layout
from megatron_ral.attention.layout import RowLayout

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def capture_rows_forward(
    model, batches: list[dict], layouts: list[RowLayout], config: CaptureConfig = CaptureConfig()
) -> list[Tensor] | None:
    """Rows p [B, R, T] of every micro-batch from one forward-only pipeline pass (no grad).

    ``batches``: the model's keyword inputs (input_ids [B, S], optional attention_mask and vision
    inputs), the same on every rank; ``layouts``: the rows of each. Returns the list of rows on the
    last pipeline stage (every TP rank), None on the other stages. Under context parallelism every CP rank
    gets the batch's whole rows, over the padded key sequence (a multiple of 2 * CP: keys past S are 0).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if len(batches) != len(layouts) or not batches:
        raise ValueError(f"need one layout per micro-batch, got {len(batches)} batches and {len(layouts)} layouts")
    sizes = {b["input_ids"].shape[0] for b in batches}
    if len(sizes) != 1:
        raise ValueError(f"micro-batches must have one batch size, got {sorted(sizes)}")
    capture = AttentionCapture(model, config)
    items = iter(list(zip(batches, layouts)))

    def forward_step(data_iterator, chunk):
        batch, layout = next(data_iterator)
        with capture.capture(layout, grad=False) as result:
            output = chunk(**batch)

        def collect(output_tensor, non_loss_data=True):
            # under context parallelism each CP rank holds the rows of its response tokens: put them together
            return result.rows if result.cp is None or result.rows is None else result.cp.full_rows(result.rows)

        return output, collect

    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=items, model=[model], num_microbatches=len(batches),
            seq_length=max(b["input_ids"].shape[1] for b in batches), micro_batch_size=sizes.pop(),
            forward_only=True, collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return list(collected)


def rows_to_rank0(rows: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor | None:
    """The last stage's rows on global rank 0 (None elsewhere); ``shape`` known to every rank.

    Rank 0 sits on the first pipeline stage; the last-stage rank of its pipeline sends (gloo / NCCL p2p).
    """
    from megatron.core import parallel_state

    if not dist.is_initialized() or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return rows if (not dist.is_initialized() or dist.get_rank() == 0) else None
    rank = dist.get_rank()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    first = parallel_state.get_pipeline_model_parallel_first_rank()
    if rank == 0:
        if last == 0:
            return rows
        buf = torch.empty(shape, dtype=dtype, device=_device())
        dist.recv(buf, src=last)
        return buf
    if first == 0 and rank == last:
        dist.send(rows.to(dtype).contiguous(), dst=0)
    return None


def _device() -> torch.device:
    from megatron_ral.platform import device

    return device()


def dump_attention(model, prompt, response_ids: list[int], config: CaptureConfig = CaptureConfig()) -> dict | None:
    """Rows of ``response_ids`` appended to ``prompt`` (a PromptInput), on global rank 0.

    Returns ``{"rows": float32 [R, T], "prompt_length": P, "input_ids": int64 [T]}`` on rank 0 (None
    elsewhere): row r is the attention policy of the token at 0-based position P + r over positions
    0 .. P + r - 1 (zero from P + r on), T = P + R.
    """
    response = torch.as_tensor(list(response_ids), dtype=torch.long)
    if response.numel() == 0:
        raise ValueError("the response has no tokens")
    plen = len(prompt)
    input_ids = torch.cat([prompt.input_ids.long().cpu(), response])
    dev = _device()
    batch = {"input_ids": input_ids[None].to(dev)}
    for key in VISION_KEYS:
        value = getattr(prompt, key)
        if value is not None:
            batch[key] = value.to(dev)
    layout = response_layout([plen], [response.numel()])
    rows = capture_rows_forward(model, [batch], [layout], config)
    local = None if rows is None else rows[0][0].float()[:, : input_ids.numel()]  # (CP: keys past the padding)
    gathered = rows_to_rank0(local, (response.numel(), input_ids.numel()))
    if gathered is None:
        return None
    return {"rows": gathered.cpu(), "prompt_length": plen, "input_ids": input_ids}
