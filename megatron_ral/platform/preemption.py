"""SIGTERM as a request to checkpoint and stop (SLURM sends it before the time limit; torchrun forwards it).

The handler only sets a flag; the trainer asks :meth:`PreemptionFlag.requested` at the end of each
step, which all-reduces the flag (MAX over the world) so that every rank sees the request at the same
step, saves the same checkpoint, and exits 0; :attr:`PreemptionFlag.signal_name` then names the signal
(the highest signal number any rank received).

Under SLURM the signal also reaches the data-loader workers; they ignore it
(:mod:`megatron_ral.platform.worker_signals`), so the step in progress finishes.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class PreemptionFlag:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,), enabled: bool = True) -> None:
        self._set = False
        self._signum = 0        # this rank's signal
        self.received = 0       # the world's, after requested() returned True
        self._previous = {}
        self.enabled = enabled
        if enabled:
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if not self._set:
            log.warning("received signal %d: will save a checkpoint and stop after this step", signum)
        self._set = True
        self._signum = max(self._signum, int(signum))

    @property
    def local(self) -> bool:
        return self._set

    def requested(self) -> bool:
        """True on every rank if any rank received the signal (collective when distributed)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.received = self._signum if self._set else 0
            return self._set
        flag = torch.tensor([float(self._signum) if self._set else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.received = int(flag.item())
        return self.received > 0

    @property
    def signal_name(self) -> str:
        """The received signal's name ("SIGTERM"), "" before any."""
        if not self.received:
            return ""
        try:
            return signal.Signals(self.received).name
        except ValueError:
            return f"signal {self.received}"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
