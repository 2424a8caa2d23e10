"""One optimizer step after a forward/backward schedule, with the non-finite guard.

The schedule has accumulated (and megatron's ``finalize_model_grads`` reduced) the gradients into the
DDP buffers. Before stepping, every rank checks its loss and its gradient buffers for NaN/Inf and the
flag is all-reduced over the world: if any rank saw one, no rank steps (gradients are dropped, weights,
optimizer state and LR schedule are unchanged) and the step is reported as skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class StepOutcome:
    """``stepped`` False when the step was skipped for a non-finite loss or gradient."""

    stepped: bool
    grad_norm: float
    lr: float


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


def optimizer_step(model_chunks: list, optimizer, scheduler, loss_finite: bool = True) -> StepOutcome:
    """Step optimizer and LR schedule unless any rank has a non-finite loss or gradient."""
    ok = _all_ranks_ok(loss_finite and _grads_finite(model_chunks))
    lr = float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else 0.0
    if not ok:
        zero_grads(model_chunks, optimizer)
        return StepOutcome(stepped=False, grad_norm=float("nan"), lr=lr)
    success, grad_norm, _ = optimizer.step()
    if not success:  # megatron's own skip (fp16 loss-scale overflow)
        return StepOutcome(stepped=False, grad_norm=float("nan"), lr=lr)
    scheduler.step(increment=1)
    return StepOutcome(stepped=True, grad_norm=float(grad_norm) if grad_norm is not None else math.nan, lr=lr)
