"""A frozen module's tensors kept in host memory between uses and moved to the device for each use.

    offload = HostOffload(model)        # copies parameters and buffers to (pinned) host memory, frees the device copies
    with offload.resident():            # device copies made for the block (one host-to-device copy per tensor)
        model(...)
    # after the block the device copies are released again

For a forward-only model (a teacher): its weights never change, so the host copy is written once, at
construction, and only read afterwards. That rules out the race the reference-weights swap has to guard
against (an asynchronous device-to-host copy into a buffer that is still being read): host buffers are
never rewritten, and a host-to-device copy from pinned memory is ordered on the current stream before the
kernels that read its result. Releasing a device copy at the end of the block is stream-ordered by
PyTorch's caching allocator (the memory is reused only by later work on the same stream).

Between uses each parameter's ``.data`` is an empty tensor on the device (the Parameter objects, and the
references megatron modules keep to them, e.g. a tied output layer, stay the same objects).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of ``module``, each once (shared ones, e.g. tied weights, counted once)."""
    seen, out = set(), []
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class HostOffload:
    """Host-resident copies of a frozen module's parameters and buffers (see the module docstring)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._tensors = _tensors(module)
        pin = torch.cuda.is_available()
        self._host: list[torch.Tensor] = []
        self._device: list[torch.device] = []
        with torch.no_grad():
            for t in self._tensors:
                host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin and t.is_cuda)
                host.copy_(t.detach())
                self._host.append(host)
                self._device.append(t.device)
        self._resident = True
        self._release()

    def nbytes(self) -> int:
        """Bytes held in host memory."""
        return sum(h.numel() * h.element_size() for h in self._host)

    def device_bytes(self) -> int:
        """Bytes the module holds on its device right now (0 between uses)."""
        return sum(t.numel() * t.element_size() for t in self._tensors)

    @property
    def is_resident(self) -> bool:
        return self._resident

    @torch.no_grad()
    def _load(self) -> None:
        for t, host, device in zip(self._tensors, self._host, self._device):
            # a CPU "device" is the host itself: the host copy is used as is (it is never written)
            t.data = host.to(device, non_blocking=True) if device.type != "cpu" else host
        self._resident = True

    @torch.no_grad()
    def _release(self) -> None:
        for t, device in zip(self._tensors, self._device):
            t.data = torch.empty(0, dtype=t.dtype, device=device)
        self._resident = False

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """The module's tensors are on their device inside the block."""
        if self._resident:
            raise RuntimeError("the offloaded module is already resident (nested resident() blocks)")
        self._load()
        try:
            yield
        finally:
            self._release()
