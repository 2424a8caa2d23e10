"""The reference policy pi_ref of the KL term: the initial weights, swapped into the one model object.

No second model is built: the reference keeps a copy of the *trainable* parameters of this rank's
model chunks as they were at the start of training (frozen parameters, e.g. the vision tower, are the
same for both policies). ``with reference.active():`` exchanges the copy with the live weights
parameter by parameter, runs the reference forward, and exchanges them back bit for bit; optimizer
state (including the fp32 main weights of mixed precision) is never touched.

placement "device" keeps the copy in device memory (fast swaps, one extra copy of the trainable
weights, one parameter of scratch memory). "host" keeps it in host memory (pinned with CUDA) and
moves each parameter across for the swap: no device memory, two transfers per parameter per swap.

The host swap of a piece of a parameter goes through a pinned staging buffer (``staging_bytes``):

    staging <- live      device -> host, asynchronous
    live    <- copy      host -> device, asynchronous, ordered after the first on the same stream
    wait                 both transfers complete: the copy has been read, the staging written
    copy    <- staging   host memory copy

The host copy is never written while a transfer may still be reading it (an asynchronous copy from
pinned memory reads it after ``copy_`` returns; overwriting it before the transfer completes would
corrupt the live and the reference weights alike). On a machine without CUDA the transfers are plain
copies and ``wait`` does nothing; the order of operations is the same.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PLACEMENTS = ("device", "host")
STAGING_BYTES = 64 * 2**20


def trainable_parameters(model_chunks: list) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter with requires_grad in the chunks, in a fixed order."""
    out = []
    for i, chunk in enumerate(model_chunks):
        for name, p in chunk.named_parameters():
            if p.requires_grad:
                out.append((f"{i}.{name}", p))
    return out


class Transfers:
    """Copies between host and device memory: asynchronous on CUDA (the current stream), plain on CPU."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def wait(self, device: torch.device) -> None:
        """Return when every copy issued on ``device``'s current stream has completed."""
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()


class ReferenceWeights:
    """A snapshot of the trainable weights that can be swapped into the model."""

    def __init__(self, model_chunks: list, placement: str = "device", source: str = "",
                 staging_bytes: int = STAGING_BYTES, transfers: Transfers | None = None) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"reference placement must be one of {PLACEMENTS}, got {placement!r}")
        self.placement = placement
        self.source = source
        self._params = trainable_parameters(model_chunks)
        self._transfers = transfers or Transfers()
        pin = placement == "host" and torch.cuda.is_available()
        with torch.no_grad():
            if placement == "device":
                self._copies = [p.detach().clone() for _, p in self._params]
                self._staging = None
            else:
                for name, p in self._params:
                    if not p.is_contiguous():
                        raise ValueError(f"reference placement 'host' needs contiguous parameters; {name} is not")
                self._copies = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin).copy_(p.detach())
                                for _, p in self._params]
                largest = max((p.numel() * p.element_size() for _, p in self._params), default=0)
                self._staging = torch.empty(max(1, min(largest, staging_bytes)), dtype=torch.uint8, device="cpu",
                                            pin_memory=pin)
        self._active = False

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self._copies)

    @torch.no_grad()
    def _swap_on_device(self) -> None:
        for (_, p), ref in zip(self._params, self._copies):
            live = p.detach()
            tmp = live.clone()
            live.copy_(ref)
            ref.copy_(tmp)

    @torch.no_grad()
    def _swap_through_host(self) -> None:
        t = self._transfers
        for (_, p), ref in zip(self._params, self._copies):
            live, host = p.detach().view(-1), ref.view(-1)
            step = max(1, self._staging.numel() // live.element_size())
            staging = self._staging[: step * live.element_size()].view(live.dtype)
            for a in range(0, live.numel(), step):
                b = min(a + step, live.numel())
                stage = staging[: b - a]
                t.copy(stage, live[a:b])         # device -> host (staging)
                t.copy(live[a:b], host[a:b])     # host -> device, after the read of live on the same stream
                t.wait(live.device)              # host[a:b] is read and stage written: both may be reused
                host[a:b].copy_(stage)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The reference weights are in the model inside the block; the policy's are restored after it."""
        if self._active:
            raise RuntimeError("reference weights are already active")
        swap = self._swap_on_device if self.placement == "device" else self._swap_through_host
        swap()
        self._active = True
        try:
            yield
        finally:
            swap()
            self._active = False
