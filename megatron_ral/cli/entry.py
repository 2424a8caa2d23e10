"""The one way every entry point ends on bad input.

    def main(argv=None) -> int: ...
    def cli() -> NoReturn:                       # console entry point; tools/*.py call it too
        run_main(prog_name("generate.py"), main)

A :class:`~megatron_ral.errors.UserError` prints ``<prog>: error: <message>`` on stderr and exits with
code 2; ``MEGATRON_RAL_DEBUG=1`` also prints its traceback. Any other exception is a bug and keeps its
traceback (exit 1).

In a multi-rank job (torchrun, srun) the error is printed once and the process ends at once:

* an error every rank raises alike (``same_on_every_rank``, by default any error raised before
  ``torch.distributed`` is initialised, such as a flag or config check) is printed by rank 0; the other
  ranks stay silent for :data:`SILENT_RANK_GRACE_S` seconds, the time for rank 0 to report and for the
  launcher to stop the job, and then print it themselves (``rank N: ...``), so that an error only they
  hit (a file missing on their node) is never lost;
* an error of one rank (raised after initialisation) is printed by that rank, prefixed ``rank N:``.

A rank whose collective fails because a peer has exited (the peer's own error is the report) prints one
``stopped`` line instead of a traceback (``MEGATRON_RAL_DEBUG=1`` shows it) and exits 1.

The exit path runs no collective: once ``torch.distributed`` is initialised with more than one rank the
process leaves through ``os._exit`` after flushing stdout and stderr (no process-group teardown, no
interpreter shutdown that could wait for peers). torchrun's agent then stops the other ranks; under
``srun`` use ``--kill-on-bad-exit=1`` so that SLURM does the same.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Callable, NoReturn, Sequence

from megatron_ral.errors import UserError
from megatron_ral.platform.launch_env import rank_and_world

USAGE_EXIT = 2
BUG_EXIT = 1
INTERRUPT_EXIT = 130
SILENT_RANK_GRACE_S = 5.0

# What gloo / NCCL / the c10d store say when the process at the other end has gone.
_PEER_LOSS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
              "communicator was aborted", "Connection refused")

# argv[0] of `python -m pkg.module` and `python -c`: not a name to show.
_NOT_A_PROGRAM = ("", "-c", "-m", "__main__.py")


def prog_name(default: str) -> str:
    """The name the user ran: ``generate.py`` for ``python tools/generate.py``, ``megatron-ral-generate``
    for the console script, ``default`` otherwise (``python -m ...``, ``python -c ...``, tests)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return default if name in _NOT_A_PROGRAM else name


def debug_enabled() -> bool:
    return os.environ.get("MEGATRON_RAL_DEBUG", "") not in ("", "0")


def format_user_error(prog: str, err: BaseException, rank: int | None = None) -> str:
    """``<prog>: error: [rank N: ]<first line of the message>``."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    message = lines[0] if lines else type(err).__name__
    where = f"rank {rank}: " if rank is not None else ""
    return f"{prog}: error: {where}{message}"


def distributed_active() -> tuple[bool, int]:
    """(torch.distributed initialised in this process, its world size); never imports torch."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return True, int(dist.get_world_size())
    except Exception:  # noqa: BLE001 - the error path must not raise
        pass
    return False, 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not hide the exit code
            pass


def _leave(code: int, hard: bool) -> NoReturn:
    _flush()
    if hard:
        os._exit(code)
    sys.exit(code)


def report_user_error(prog: str, err: UserError) -> None:
    """Print the error line (or stay silent) following the multi-rank rule of the module docstring."""
    rank, world = rank_and_world()
    active, dist_world = distributed_active()
    world = max(world, dist_world)
    if debug_enabled():
        traceback.print_exc()
    if world <= 1:
        print(format_user_error(prog, err), file=sys.stderr, flush=True)
        return
    shared = err.same_on_every_rank if err.same_on_every_rank is not None else not active
    if not shared:
        print(format_user_error(prog, err, rank), file=sys.stderr, flush=True)
        return
    if rank == 0:
        print(format_user_error(prog, err), file=sys.stderr, flush=True)
        return
    # Rank 0 reports an error shared by all ranks, and the launcher stops this process meanwhile; still
    # alive after the grace period means rank 0 did not fail the same way: say it here.
    time.sleep(SILENT_RANK_GRACE_S)
    print(format_user_error(prog, err, rank), file=sys.stderr, flush=True)


def run_main(prog: str, main: Callable[[Sequence[str] | None], int | None],
             argv: Sequence[str] | None = None) -> NoReturn:
    """Call ``main(argv)`` and exit with its return code (0 for None); user errors exit 2 with one line."""
    try:
        code = main(argv)
    except UserError as e:
        report_user_error(prog, e)
        _leave(USAGE_EXIT, hard=_multi_rank_group())
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        _leave(INTERRUPT_EXIT, hard=_multi_rank_group())
    except SystemExit:
        raise
    except BaseException as e:
        if not _multi_rank_group():
            raise
        symptom = peer_lost(e)
        if symptom and not debug_enabled():
            rank = rank_and_world()[0]
            print(f"{prog}: rank {rank}: stopped: another rank exited during a collective ({symptom})",
                  file=sys.stderr, flush=True)
        else:
            traceback.print_exc()  # a bug: its traceback, then out without waiting for the peers
        _leave(BUG_EXIT, hard=True)
    _leave(int(code or 0), hard=False)


def peer_lost(err: BaseException) -> str | None:
    """The symptom (e.g. "Connection reset by peer") of a torch.distributed failure caused by a peer
    process that has exited, None for any other error."""
    if not isinstance(err, RuntimeError):
        return None
    text = str(err)
    return next((s for s in _PEER_LOSS if s in text), None)


def _multi_rank_group() -> bool:
    active, world = distributed_active()
    return active and world > 1
