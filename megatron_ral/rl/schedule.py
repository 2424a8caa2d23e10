"""One pass of the model over a list of micro-batches through megatron-core's pipeline schedule.

Every pass of the trainer (old policy, reference, updates, SFT) goes through :func:`run_pass`: the
schedule (1F1B with pipeline parallelism, a plain loop without) calls the model on each micro-batch,
optionally inside an attention-capture block, and hands the last stage's per-token loss output (and the
captured rows) to a per-micro-batch ``consume`` function, which returns the loss to back-propagate (or
nothing for forward-only passes) and metrics.

Loss scaling. megatron divides each micro-batch loss by the number of micro-batches and DDP averages
gradients over data-parallel ranks. The trainer's losses are already normalised by the global
mini-batch (see ``rl.losses``), so :func:`run_pass` multiplies them by ``num_microbatches x dp_size``:
the gradient is then exactly the gradient of the sum of the micro-batch losses over all ranks.

Context parallelism (C ranks per sequence) needs no further factor: every CP rank holds the whole loss
(its per-token terms summed over the CP group, whose backward is the identity: each rank's gradient is its
own tokens' part), megatron's schedule multiplies the loss by C and DDP averages over DP x C, so the C
parts add up to the unsplit gradient; ``dp_size`` is the data-parallel size without CP.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from megatron_ral.rl.batch import MicroBatch, micro_batch_vision


@dataclass
class PassContext:
    """What a pass needs besides the micro-batches: the model chunks, the per-prompt vision features of
    the first stage, the capture bridge and the sampling temperature for log-probs."""

    model: list
    vision: list = field(default_factory=list)
    capture: object = None
    temperature: float = 1.0


Consume = Callable[[MicroBatch, Tensor, object], "tuple[Tensor | None, dict]"]


def _inner(model):
    m = model
    while hasattr(m, "module") and not hasattr(m, "last_layer_core_attention"):
        m = m.module
    return m


def host_inputs(mb: MicroBatch, model) -> tuple[Tensor, Tensor | None]:
    """(M-RoPE position ids (3, B, S), megatron attention mask or None) of a micro-batch, computed once on
    the host and reused by every pass over it. The model would derive both from the device copies of the
    token ids and padding mask, reading them in Python (the rope index walks each row's tokens; the
    padding check asks whether any padding exists): a device synchronisation at every read."""
    from megatron_ral.models.qwen25vl.model import attention_mask_from_padding

    if "position_ids" not in mb.host_inputs:
        position_ids, _ = model.compute_position_ids(mb.input_ids, mb.image_grid_thw, mb.video_grid_thw,
                                                     mb.second_per_grid_ts, mb.attention_mask)
        mb.host_inputs["position_ids"] = position_ids
        mb.host_inputs["attention_mask"] = attention_mask_from_padding(mb.attention_mask)
    return mb.host_inputs["position_ids"], mb.host_inputs["attention_mask"]


def model_inputs(mb: MicroBatch, vision: list, pre_process: bool, model=None) -> dict:
    """Keyword arguments of Qwen25VLModel.forward for a micro-batch (vision features on the first stage).
    With ``model`` (this stage's Qwen25VLModel) the position ids and the attention mask are computed on
    the host (:func:`host_inputs`); without, the model derives them from the padding mask. A packed
    micro-batch gives its stream with the stream's layout, which carries the M-RoPE positions (host tensors)."""
    if mb.packed is not None:
        inputs = {"input_ids": mb.packed.input_ids, "layout": mb.packed.layout,
                  "position_ids": mb.packed.layout.position_ids, "labels": mb.packed.labels,
                  "loss_index": mb.packed.loss_index, "labels_at_index": True}
        if pre_process and vision:
            inputs["vision_embeddings"] = micro_batch_vision(mb, vision)
        return inputs
    inputs = {
        "input_ids": mb.input_ids,
        "attention_mask": mb.attention_mask,
        "labels": mb.labels,
        "loss_index": mb.gather_index,   # the output layer and the loss at the response positions only
        "image_grid_thw": mb.image_grid_thw,
        "video_grid_thw": mb.video_grid_thw,
        "second_per_grid_ts": mb.second_per_grid_ts,
    }
    if model is not None:
        inputs["position_ids"], inputs["attention_mask"] = host_inputs(mb, model)
    if pre_process and vision:
        inputs["vision_embeddings"] = micro_batch_vision(mb, vision)
    return inputs


def _to_device(inputs: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in inputs.items()}


def run_pass(ctx: PassContext, micro_batches: list[MicroBatch], consume: Consume, *, forward_only: bool,
             capture_kwargs: Callable[[MicroBatch], dict | None] | None = None,
             return_logits: bool = False) -> list[dict]:
    """Run the schedule over ``micro_batches``; returns the metrics dict of each micro-batch (last stage).

    ``consume(mb, token_loss, capture_result)`` runs on the last stage: ``token_loss`` is the model's
    per-token loss at the response positions (-log p of each response token under softmax(logits / T);
    [B, R] padded, [1, N] packed: ``mb.token_logprobs`` maps either to [B, R]); it returns
    (loss or None, metrics). ``capture_kwargs(mb)`` gives the keyword arguments of
    ``AttentionCapture.capture`` for a micro-batch (None: no capture). With ``return_logits`` the model
    also returns its vocab-parallel logits at the response positions ([B, R, V/TP] padded, [1, N, V/TP]
    packed: ``mb.to_rows`` maps either to [B, R, V/TP]; unscaled; see ``Qwen25VLModel.forward``) and
    ``consume`` is called as ``consume(mb, token_loss, result, logits)``.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    num = len(micro_batches)
    dp = parallel_state.get_data_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    scale = float(num * dp)
    device = next(_inner(ctx.model[0]).language_model.parameters()).device

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        inner = _inner(model)
        inputs = _to_device(model_inputs(mb, ctx.vision, inner.pre_process, inner), device)
        kwargs = capture_kwargs(mb) if (capture_kwargs is not None and ctx.capture is not None) else None
        block = ctx.capture.capture(mb.layout, **kwargs) if kwargs is not None else contextlib.nullcontext()
        with block as result:
            output = model(**inputs, temperature=ctx.temperature, **({"return_logits": True} if return_logits else {}))

        def loss_func(output):
            if return_logits:  # the last stage returns (token_loss, logits); megatron hands the tuple over as is
                token_loss, logits = output
                loss, metrics = consume(mb, token_loss, result, logits)
            else:
                token_loss = output
                loss, metrics = consume(mb, token_loss, result)
            if loss is None:
                return token_loss.sum() * 0.0, metrics
            # the schedule scales the returned tensor in place: log the value before
            return loss * scale, metrics

        return output, loss_func

    # (pipeline buffers; megatron exchanges each micro-batch's shape: variable_seq_lengths) a packed pass's
    # micro-batches are streams of at most the token budget, one row each
    seq_len = max(mb.forward_shape[1] for mb in micro_batches)
    mbs = max(mb.forward_shape[0] for mb in micro_batches)
    grad_ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
    with grad_ctx:
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=ctx.model,
            num_microbatches=num, seq_length=seq_len, micro_batch_size=mbs, forward_only=forward_only,
        )
    return list(out or [])
