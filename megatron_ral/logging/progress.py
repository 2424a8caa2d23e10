"""Progress bars for long work (conversion, preprocessing, generation): tqdm on rank 0's stderr, silent
elsewhere, when output is not a terminal and MEGATRON_RAL_PROGRESS=0, or when disabled."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    if os.environ.get("MEGATRON_RAL_PROGRESS", "1") == "0":
        return False
    return int(os.environ.get("RANK", "0")) == 0


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, unit: str = "it",
             enabled: bool | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on rank 0 (a plain pass-through elsewhere)."""
    if enabled is None:
        enabled = progress_enabled()
    if not enabled:
        yield from iterable
        return
    from tqdm.auto import tqdm

    # Not a terminal (CI, SLURM logs): fewer, line-based updates.
    mininterval = 0.5 if sys.stderr.isatty() else 10.0
    yield from tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, mininterval=mininterval,
                    dynamic_ncols=True, leave=False)
