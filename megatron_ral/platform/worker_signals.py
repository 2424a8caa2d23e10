"""Data-loader workers that survive a SIGTERM meant for their trainer.

SLURM (``--signal=TERM@...``, ``scancel --signal=TERM``) signals every process of a job step: the
trainer and its data-loader workers alike. PyTorch's workers die on a SIGTERM that does not come from
their parent, and the trainer then raises "DataLoader worker (pid ...) is killed by signal: Terminated"
in the middle of its step, before :class:`~megatron_ral.platform.preemption.PreemptionFlag` can save.
Here a worker keeps SIGTERM blocked and a thread of its own takes each one with ``sigwaitinfo``:

* sent by the worker's parent (the trainer's ``DataLoader`` shutting down a worker, multiprocessing's
  exit handler): the worker exits at once, as PyTorch's own handler does;
* sent by anyone else (the job's process group): ignored; the trainer decides when to stop and ends
  its workers the ordinary way (a worker whose trainer has gone exits through PyTorch's watchdog).

The trainer process blocks SIGTERM while it creates workers (:func:`start_workers`), so a signal
arriving between a worker's birth and its init function stays pending in the worker and reaches the
thread, and the trainer's own copy is delivered to its handler when the block ends. Workers inherit the
block when forked, and when spawned (``spawn``, the loader's choice when DALI decodes on the GPU) provided
multiprocessing's resource tracker already runs: starting it unblocks SIGTERM in the caller, so
:func:`start_workers` starts it first. (Workers forked by a ``forkserver`` inherit the server's mask, not
the trainer's: there a SIGTERM in the first instants of a worker can still end it.)

    it = start_workers(DataLoader(..., worker_init_fn=ignore_foreign_sigterm))
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM,)


@contextlib.contextmanager
def signals_blocked(signals: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """Block `signals` in the calling thread for the duration (processes forked or spawned meanwhile
    inherit the block); signals that arrived meanwhile are delivered when it ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_workers(loader):
    """``iter(loader)`` with SIGTERM blocked while the loader starts its workers (see the module docstring)."""
    context = getattr(loader, "multiprocessing_context", None)
    method = context.get_start_method() if context is not None else None
    if getattr(loader, "num_workers", 0) > 0 and method not in (None, "fork"):
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()  # it unblocks SIGTERM when it starts: not inside the block
    with signals_blocked():
        return iter(loader)


def _take_signals(parent: int, signals: tuple[int, ...]) -> None:
    while True:
        info = signal.sigwaitinfo(signals)
        if info.si_pid == parent:
            os._exit(0)  # the DataLoader (or multiprocessing at exit) ends this worker


def ignore_foreign_sigterm(worker_id: int = 0, signals: tuple[int, ...] = SIGNALS) -> None:  # noqa: ARG001
    """``worker_init_fn`` of a DataLoader: from now on SIGTERM ends this worker only when its parent
    sends it (see the module docstring). Without ``sigwaitinfo`` (not Linux), SIGTERM is ignored."""
    if not hasattr(signal, "sigwaitinfo"):
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # threads started from here on inherit it
    threading.Thread(target=_take_signals, args=(os.getppid(), tuple(signals)), name="sigterm-filter",
                     daemon=True).start()


__all__ = ["SIGNALS", "ignore_foreign_sigterm", "signals_blocked", "start_workers"]
