"""``RUN_DIR/STOPPED_EARLY``: the run stopped on a signal after saving, and should be continued.

Lifecycle:

* a run that starts (or resumes) removes it: from then on this run is in charge;
* a run stopped by a signal (SLURM's warning before the time limit, a preemption) writes it after the
  checkpoint is complete, then exits 0;
* a run that finishes never writes it, so a finished run has none.

A job script therefore requeues when the trainer exited 0 and the marker is there (see
``examples/slurm/train.sbatch``); the requeued job resumes from the newest complete checkpoint. The
marker is one JSON object::

    {"step": 120, "total_steps": 500, "reason": "SIGTERM", "checkpoint": ".../iter_0000120",
     "time": "2025-01-01T12:00:00+00:00"}

Files only: no torch.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

STOP_MARKER = "STOPPED_EARLY"


def write_stop_marker(run_dir: str | os.PathLike, step: int, total_steps: int, reason: str,
                      checkpoint: str | os.PathLike | None = None) -> Path:
    """Write the marker atomically (after the checkpoint of `step` is complete)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    body = {"step": int(step), "total_steps": int(total_steps), "reason": reason,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = run_dir / STOP_MARKER
    tmp = run_dir / f".{STOP_MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(body) + "\n")
    os.replace(tmp, path)
    return path


def read_stop_marker(run_dir: str | os.PathLike) -> dict | None:
    """The marker's content; None when the run did not stop early. A marker that is not valid JSON (a
    hand-made one, a truncated write by an older version) still counts: {"reason": "unreadable marker"}."""
    path = Path(run_dir) / STOP_MARKER
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"reason": "unreadable marker"}


def clear_stop_marker(run_dir: str | os.PathLike) -> bool:
    """Remove the marker; True if there was one."""
    try:
        (Path(run_dir) / STOP_MARKER).unlink()
        return True
    except FileNotFoundError:
        return False


__all__ = ["STOP_MARKER", "clear_stop_marker", "read_stop_marker", "write_stop_marker"]
