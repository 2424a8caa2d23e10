"""Metric sums of one step and their reduction over every rank; phase timers and memory meters.

Each rank adds (sum, count) pairs for what it *owns* (the caller decides: e.g. rollout metrics on
model-parallel rank 0 of each data-parallel group, loss metrics on tensor-parallel rank 0 of the last
pipeline stage), so that replicas are not counted twice; :meth:`MetricSums.all_reduce` then adds
everything up over the whole world (keys may differ between ranks). ``mean(key)`` is sum / count,
``total(key)`` the sum. Peaks (``add_peak``) are kept apart and reduced by maximum: ``peak(key)``.

Values may be tensors (e.g. a loss term still on the GPU): they are added up as float64 tensors where
they live and read to the host together, once, by the first ``all_reduce``/``mean``/``total`` (on a
GPU every read of a tensor value is a device synchronisation; one per step instead of one per value
and micro-batch). Sums of the same values in the same order equal those of Python floats exactly.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist


class MetricSums:
    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.peaks: dict[str, float] = {}

    def add_peak(self, key: str, value: float) -> None:
        """Keep the largest value given for ``key`` (reduced by maximum over ranks)."""
        self.peaks[key] = max(self.peaks.get(key, float("-inf")), float(value))

    def add(self, key: str, value: "float | torch.Tensor", count: float = 1.0) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().to(torch.float64)
        else:
            value = float(value)
        self.sums[key] = self.sums[key] + value
        self.counts[key] += float(count)

    def _read(self) -> None:
        """Turn tensor sums into floats with one host read."""
        pending = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        if not pending:
            return
        values = torch.stack([self.sums[k].reshape(()).to(self.sums[pending[0]].device) for k in pending])
        for k, v in zip(pending, values.tolist()):
            self.sums[k] = v

    def add_all(self, values: dict[str, float], count: float = 1.0) -> None:
        for k, v in values.items():
            self.add(k, v, count)

    def merge(self, other: "MetricSums") -> None:
        for k in other.sums:
            self.add(k, other.sums[k], other.counts[k])
        for k, v in other.peaks.items():
            self.add_peak(k, v)

    def all_reduce(self, group=None) -> "MetricSums":
        """A new MetricSums holding the sums and counts of every rank of ``group`` (default: world)."""
        self._read()
        out = MetricSums()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            out.merge(self)
            return out
        keys: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(keys, (sorted(self.sums), sorted(self.peaks)), group=group)
        union = sorted(set().union(*(k for k, _ in keys)))
        peak_union = sorted(set().union(*(p for _, p in keys)))
        backend = dist.get_backend(group)
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        vec = torch.tensor([[self.sums.get(k, 0.0), self.counts.get(k, 0.0)] for k in union], dtype=torch.float64)
        if vec.numel():
            vec = vec.to(dev)
            dist.all_reduce(vec, group=group)
            vec = vec.cpu()
        for i, k in enumerate(union):
            out.sums[k] = float(vec[i, 0])
            out.counts[k] = float(vec[i, 1])
        if peak_union:
            peaks = torch.tensor([self.peaks.get(k, float("-inf")) for k in peak_union], dtype=torch.float64).to(dev)
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=group)
            out.peaks = dict(zip(peak_union, peaks.cpu().tolist()))
        return out

    def peak(self, key: str, default: float = 0.0) -> float:
        return self.peaks.get(key, default)

    def mean(self, key: str, default: float = 0.0) -> float:
        self._read()
        c = self.counts.get(key, 0.0)
        return self.sums[key] / c if c > 0 else default

    def total(self, key: str, default: float = 0.0) -> float:
        self._read()
        return self.sums.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.sums


class Timer:
    """Wall-clock seconds per named phase (``with timer("gen"): ...``), synchronised with the device."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0


def process_rss_bytes() -> int:
    """Resident set size of this process (bytes)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a megatron dist-checkpointing dependency
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Memory of named phases in GiB, the largest over the calls of each name (``with meter("teacher"):``).

    With CUDA: the peak of ``torch.cuda.max_memory_allocated`` inside the phase (the peak counter is reset
    at the start of the phase). On CPU: how much the process's resident set grew over the phase (what the
    phase allocated and kept, or left cached by the allocator; 0 if it shrank)."""

    def __init__(self) -> None:
        self.gib: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            before = process_rss_bytes()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
                used = torch.cuda.max_memory_allocated()
            else:
                used = max(process_rss_bytes() - before, 0)
            self.gib[name] = max(self.gib[name], used / 2**30)
