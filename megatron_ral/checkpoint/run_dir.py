"""A Megatron-LM checkpoint run directory: ``iter_N`` checkpoints and the ``latest`` pointer (files only).

    save_dir/iter_0000020/                       a complete torch_dist checkpoint of step 20
    save_dir/iter_0000030.tmp/                   a save in progress or a crashed one (never read)
    save_dir/latest_checkpointed_iteration.txt   "20"

A checkpoint directory only gets its ``iter_N`` name once complete (renamed from ``iter_N.tmp``), so every
``iter_N`` holding the torch_dist files is complete. The pointer is replaced atomically after the rename;
when it is missing or names no complete checkpoint, the newest complete one is the latest.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def is_dist_checkpoint(directory: str | os.PathLike) -> bool:
    """A torch_dist checkpoint directory (its ``.metadata`` and ``metadata.json`` present)."""
    d = Path(directory)
    return (d / ".metadata").is_file() and (d / "metadata.json").is_file()


TRACKER_FILE = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"^iter_(\d+)$")
_STALE_RE = re.compile(r"^iter_\d+\.(tmp|old)$")


def iteration_dir_name(step: int) -> str:
    """Megatron-LM's name of the checkpoint directory of a step: ``iter_0000020``."""
    return f"iter_{step:07d}"


def is_complete(path: Path) -> bool:
    """A torch_dist checkpoint directory with all its top-level files."""
    return path.is_dir() and is_dist_checkpoint(path) and (path / "common.pt").is_file()


def complete_checkpoints(save_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete ``iter_N`` directories of save_dir as (step, path), oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = []
    for p in save_dir.iterdir():
        m = _ITER_RE.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def read_tracker(save_dir: str | os.PathLike) -> str | None:
    """The content of the pointer file (a step number, or Megatron-LM's ``release``); None when absent."""
    try:
        text = (Path(save_dir) / TRACKER_FILE).read_text().strip()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return text or None


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a resume loads: the one the pointer names when complete; otherwise (no pointer, a
    crash between the rename and the pointer, a deleted directory) the newest complete ``iter_N``."""
    save_dir = Path(save_dir)
    tag = read_tracker(save_dir)
    if tag is not None:
        named = save_dir / (iteration_dir_name(int(tag)) if tag.isdigit() else tag)
        if is_complete(named):
            return named
    complete = complete_checkpoints(save_dir)
    return complete[-1][1] if complete else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def write_tracker(save_dir: Path, step: int) -> None:
    """Replace the pointer atomically: write a temporary file, fsync it, rename it over the old one."""
    tmp = save_dir / f".{TRACKER_FILE}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, save_dir / TRACKER_FILE)
    _fsync_dir(save_dir)


def remove_stale(save_dir: Path) -> list[Path]:
    """Delete the directories of saves that never completed (``iter_N.tmp``) and of replaced checkpoints
    (``iter_N.old``)."""
    removed = []
    for p in save_dir.iterdir():
        if _STALE_RE.match(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def commit(tmp: Path, final: Path, step: int) -> None:
    """Make the complete directory `tmp` the checkpoint `final` of `step` and point the tracker at it.
    A checkpoint of the same step already there (a run resumed from an earlier one) is replaced."""
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    write_tracker(final.parent, step)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(save_dir: Path, step: int, keep_last: int) -> list[Path]:
    """Delete the complete checkpoints older than the `keep_last` newest up to `step` (never `step`'s own).
    Checkpoints of later steps belong to a run abandoned by resuming from an earlier checkpoint: they are
    left alone here, and replaced when this run saves those steps."""
    mine = [(s, p) for s, p in complete_checkpoints(save_dir) if s <= step]
    doomed = [p for s, p in mine[:-keep_last] if s != step]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
