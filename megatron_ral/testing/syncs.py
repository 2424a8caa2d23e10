"""Count the host reads of tensor values (device synchronisations on a GPU) in a block of code.

On a GPU every ``tensor.item()``, ``float(tensor)``, ``int(tensor)``, ``bool(tensor)`` (``if tensor:``),
``tensor.tolist()`` or use as a Python index waits for the device queue to drain, which stalls the
pipeline schedule. On a CPU run the same calls are free but happen at the same places, so counting them
there bounds the synchronisations of the GPU run (CPU-side bookkeeping tensors are counted too: the
count is an upper bound).

    with SyncCounter() as syncs:
        ...
    syncs.count, syncs.by_site.most_common(5)   # (file:line of the first caller outside torch, calls)
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import torch

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS = __file__


def _short(name: str) -> str:
    for marker in ("megatron_ral" + os.sep, "megatron" + os.sep, "tests" + os.sep):
        i = name.rfind(os.sep + marker)
        if i >= 0:
            return name[i + 1:]
    return name


def _site(frames: int = 1) -> str:
    """file:line of the first caller outside torch (and of the ``frames - 1`` callers above it)."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                 or frame.f_code.co_filename == _THIS):
        frame = frame.f_back
    out = []
    while frame is not None and len(out) < frames:
        out.append(f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}")
        frame = frame.f_back
    return " < ".join(out) or "?"


class SyncCounter:
    """A context manager that counts calls of :data:`READS` on tensors (all threads of this process)."""

    def __init__(self, sites: bool = True, frames: int = 1) -> None:
        """``sites``: also count by call site (``frames`` callers deep)."""
        self.count = 0
        self.by_site: Counter = Counter()
        self.sites = sites
        self.frames = frames
        self._saved: dict = {}

    def _wrap(self, name: str, original):
        counter = self

        def read(tensor, *args, **kwargs):
            counter.count += 1
            if counter.sites:
                counter.by_site[_site(counter.frames)] += 1
            return original(tensor, *args, **kwargs)

        read.__name__ = name
        return read

    def __enter__(self) -> "SyncCounter":
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, saved in self._saved.items():
            if saved is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved)
        self._saved.clear()
