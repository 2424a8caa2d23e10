"""The reference policy pi_ref of the KL term: the initial weights, swapped into the one model object.

No second model is built: the reference keeps a copy of the *trainable* parameters of this rank's
model chunks as they were at the start of training (frozen parameters, e.g. the vision tower, are the
same for both policies). ``with reference.active():`` exchanges the copy with the live weights
parameter by parameter (one parameter of scratch memory), runs the reference forward, and exchanges
them back bit for bit; optimizer state (including the fp32 main weights of mixed precision) is never
touched.

placement "device" keeps the copy in device memory (fast swaps, one extra copy of the trainable
weights); "host" keeps it in (pinned, with CUDA) host memory and moves each parameter across for the
swap (no device memory, two transfers per parameter per reference pass).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PLACEMENTS = ("device", "host")


def trainable_parameters(model_chunks: list) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter with requires_grad in the chunks, in a fixed order."""
    out = []
    for i, chunk in enumerate(model_chunks):
        for name, p in chunk.named_parameters():
            if p.requires_grad:
                out.append((f"{i}.{name}", p))
    return out


class ReferenceWeights:
    """A snapshot of the trainable weights that can be swapped into the model."""

    def __init__(self, model_chunks: list, placement: str = "device", source: str = "") -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"reference placement must be one of {PLACEMENTS}, got {placement!r}")
        self.placement = placement
        self.source = source
        self._params = trainable_parameters(model_chunks)
        pin = placement == "host" and torch.cuda.is_available()
        with torch.no_grad():
            if placement == "device":
                self._copies = [p.detach().clone() for _, p in self._params]
            else:
                self._copies = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin).copy_(p.detach())
                                for _, p in self._params]
        self._active = False

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self._copies)

    @torch.no_grad()
    def _swap(self) -> None:
        for (_, p), ref in zip(self._params, self._copies):
            live = p.detach()
            if ref.device == live.device:
                tmp = live.clone()
                live.copy_(ref)
                ref.copy_(tmp)
            else:
                tmp = live.to(ref.device)
                live.copy_(ref.to(live.device, non_blocking=True))
                ref.copy_(tmp)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The reference weights are in the model inside the block; the policy's are restored after it."""
        if self._active:
            raise RuntimeError("reference weights are already active")
        self._swap()
        self._active = True
        try:
            yield
        finally:
            self._swap()
            self._active = False
