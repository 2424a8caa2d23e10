"""Output directories written all-or-nothing, HF side files (config, tokenizer, processor), progress lines."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

from megatron_ral.checkpoint.errors import OutputExistsError
from megatron_ral.errors import UserError

# Files that are weights or megatron/DCP checkpoint files, never copied as "side files".
_EXCLUDED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp", ".ckpt", ".h5", ".msgpack")
_EXCLUDED_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "metadata.json",
                   "common.pt", "latest_checkpointed_iteration.txt", "latest_train_state.pt"}


def is_side_file(path: Path) -> bool:
    """True for config / tokenizer / processor / template files of an HF directory (not weights)."""
    name = path.name
    return (path.is_file() and not name.startswith(".") and name not in _EXCLUDED_NAMES
            and not name.endswith(_EXCLUDED_SUFFIXES))


def copy_hf_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy config.json, generation config, tokenizer, processor and chat-template files from src to dst.

    Used by the converters and by anything that saves a Megatron checkpoint that should stay
    self-describing (convertible back to HF without extra arguments).
    """
    src, dst = Path(src), Path(dst)
    copied = []
    for path in sorted(src.iterdir()):
        if is_side_file(path):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out`, on failure it is removed.

    `out` must not exist (or be an empty directory) unless overwrite is set. Parent directories that
    do not exist are created (and removed again on failure).
    """
    out = Path(out).absolute()
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise OutputExistsError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        _remove_created(created)
        raise UserError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _remove_created(dirs: list[Path]) -> None:
    """Remove the (empty) parent directories this call created, innermost first."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


class Progress:
    """Progress lines on stderr: one per group (e.g. a decoder layer) plus a time-throttled line."""

    def __init__(self, label: str, total_bytes: int, enabled: bool = True, every_s: float = 5.0):
        self.label, self.total, self.enabled, self.every_s = label, max(total_bytes, 1), enabled, every_s
        self.done = 0
        self.t0 = self.t_last = time.perf_counter()
        self.group: str | None = None

    def update(self, nbytes: int, group: str) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if self.enabled and (group != self.group or now - self.t_last >= self.every_s):
            self._line(group, now)
        self.group = group

    def _line(self, group: str, now: float) -> None:
        rate = self.done / max(now - self.t0, 1e-9) / 1e6
        print(f"[{self.label}] {100 * self.done / self.total:5.1f}%  {self.done / 1e9:7.3f} GB  "
              f"{rate:7.1f} MB/s  {group}", file=sys.stderr, flush=True)
        self.t_last = now

    def finish(self) -> float:
        elapsed = time.perf_counter() - self.t0
        if self.enabled:
            print(f"[{self.label}] done: {self.done / 1e9:.3f} GB in {elapsed:.1f} s", file=sys.stderr, flush=True)
        return elapsed
