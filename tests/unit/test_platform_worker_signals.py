"""Data-loader workers under a SIGTERM that is not theirs: with ``ignore_foreign_sigterm`` a SIGTERM from
another process (SLURM signalling the job step) leaves them serving, one from their parent (the
DataLoader's shutdown) still ends them; without it (PyTorch's default) the same foreign signal kills a
worker and the loader raises."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_ral.platform.worker_signals import ignore_foreign_sigterm, signals_blocked, start_workers

N = 12


class Slow(IterableDataset):
    """0..N-1, split over the workers, each item after a short pause."""

    def __iter__(self):
        info = get_worker_info()
        for i in range(info.id, N, info.num_workers):
            time.sleep(0.05)
            yield i


def _loader(init_fn, context=None):
    return DataLoader(Slow(), batch_size=None, num_workers=2, prefetch_factor=1, worker_init_fn=init_fn,
                      multiprocessing_context=context)


def _foreign_sigterm(pids) -> None:
    """SIGTERM sent by another process (like slurmstepd), not by the workers' parent."""
    subprocess.run(["kill", "-TERM", *map(str, pids)], check=True)


@pytest.mark.parametrize("context", [None, "spawn"])    # spawn: the loader's context when DALI decodes on GPU
def test_foreign_sigterm_is_ignored(context):
    it = start_workers(_loader(ignore_foreign_sigterm, context))
    workers = list(it._workers)
    _foreign_sigterm(w.pid for w in workers)        # at once: possibly before the init function ran
    first = [next(it) for _ in range(3)]
    _foreign_sigterm(w.pid for w in workers)        # and again while they serve
    time.sleep(0.3)
    assert all(w.is_alive() for w in workers)
    rest = list(it)                                 # the loader ends its workers itself at the end
    assert sorted(first + rest) == list(range(N))
    for w in workers:
        w.join(timeout=10)
    assert [w.exitcode for w in workers] == [0, 0]


def test_the_parents_sigterm_still_ends_a_worker():
    """What DataLoader's shutdown of a stuck worker and multiprocessing's exit handler send."""
    it = start_workers(_loader(ignore_foreign_sigterm))
    assert next(it) in (0, 1)                       # the workers have run their init function
    workers = list(it._workers)
    for w in workers:
        w.terminate()                               # os.kill from this process, the workers' parent
    for w in workers:
        w.join(timeout=10)
    assert [w.exitcode for w in workers] == [0, 0]
    del it


def test_without_it_a_foreign_sigterm_kills_a_worker():
    it = iter(_loader(None))
    assert next(it) in (0, 1)
    victim = it._workers[0]
    with pytest.raises(RuntimeError, match="DataLoader worker"):  # raised by the loader's SIGCHLD handler
        _foreign_sigterm([victim.pid])
        victim.join(timeout=10)
        list(it)
    victim.join(timeout=10)
    assert victim.exitcode == -signal.SIGTERM


def test_signals_blocked_delivers_after_the_block():
    """The mask is per thread (what a forked worker inherits): the signal is sent to this thread, since a
    process-directed one may be taken by any other thread of the test process (torch's, earlier tests')."""
    import threading

    got = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    try:
        with signals_blocked((signal.SIGUSR1,)):
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
            time.sleep(0.05)
            assert got == []
        time.sleep(0.05)
        assert got == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
