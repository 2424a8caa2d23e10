"""One optimizer step after a forward/backward schedule, with the non-finite guard.

The schedule has accumulated (and megatron's ``finalize_model_grads`` reduced) the gradients into the
DDP buffers. Before stepping, every rank checks its loss and its gradient buffers for NaN/Inf and the
flag is all-reduced over the world: if any rank saw one, no rank steps (gradients are dropped, weights,
optimizer state and LR schedule are unchanged) and the step is reported as skipped.

fp16 (megatron's dynamic loss scaler present): the gradients are those of the scaled loss, and an
overflow is the scaler's business, not a failure: only the loss is checked here; the optimizer unscales
the gradients, checks them for inf/NaN over its own groups and, on overflow, skips the update and backs
the scale off. Such a step is reported as a loss-scale skip (``loss_scale_skipped``), apart from the
non-finite skips that the trainer's stop rule counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class StepOutcome:
    """``stepped`` False when no update was made: for a non-finite loss or gradient, or (fp16) for a
    gradient overflow of the scaled loss (``loss_scale_skipped``). ``loss_scale``: the loss scale after
    the step (1 without fp16)."""

    stepped: bool
    grad_norm: float
    lr: float
    loss_scale_skipped: bool = False
    loss_scale: float = 1.0


def zero_grads(model_chunks: list, optimizer) -> None:
    for chunk in model_chunks:
        if hasattr(chunk, "zero_grad_buffer"):
            chunk.zero_grad_buffer()
    optimizer.zero_grad()


def _grads_finite(model_chunks: list) -> bool:
    for chunk in model_chunks:
        buffers = getattr(chunk, "buffers", None)
        if buffers:
            for buf in buffers:
                if not bool(torch.isfinite(buf.grad_data).all()):
                    return False
        else:
            for p in chunk.parameters():
                g = getattr(p, "main_grad", None)
                g = p.grad if g is None else g
                if g is not None and not bool(torch.isfinite(g).all()):
                    return False
    return True


def _all_ranks_ok(ok: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return float(flag.item()) == 0.0


def uses_loss_scaling(optimizer) -> bool:
    """True for megatron's fp16 optimizers (a grad scaler: the loss is scaled, overflows are skipped)."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(getattr(part, "grad_scaler", None) is not None for part in parts)


def _loss_scale(optimizer, scaled: bool) -> float:
    return float(optimizer.get_loss_scale()) if scaled else 1.0


def optimizer_step(model_chunks: list, optimizer, scheduler, loss_finite: bool = True) -> StepOutcome:
    """Step optimizer and LR schedule unless any rank has a non-finite loss or gradient (under fp16: a
    non-finite loss, or an overflow that the optimizer's scaler finds)."""
    scaled = uses_loss_scaling(optimizer)
    ok = _all_ranks_ok(loss_finite and (scaled or _grads_finite(model_chunks)))
    lr = float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else 0.0
    if not ok:
        zero_grads(model_chunks, optimizer)
        return StepOutcome(stepped=False, grad_norm=float("nan"), lr=lr, loss_scale=_loss_scale(optimizer, scaled))
    success, grad_norm, _ = optimizer.step()
    if not success:  # megatron's own skip: an fp16 gradient overflow (the scale backs off)
        return StepOutcome(stepped=False, grad_norm=float("nan"), lr=lr, loss_scale_skipped=True,
                           loss_scale=_loss_scale(optimizer, scaled))
    scheduler.step(increment=1)
    return StepOutcome(stepped=True, grad_norm=float(grad_norm) if grad_norm is not None else math.nan, lr=lr,
                       loss_scale=_loss_scale(optimizer, scaled))
