"""Console logging: INFO on rank 0, WARNING and above on every rank (prefixed with the rank)."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "[%(asctime)s] %(levelname).1s %(name)s: %(message)s"


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank != 0 and record.levelno < logging.WARNING:
            return False
        if self.rank != 0:
            record.msg = f"[rank {self.rank}] {record.msg}"
        return True


def setup_logging(level: int | str = "INFO", rank: int | None = None) -> logging.Logger:
    """Configure the ``megatron_ral`` logger once (later calls only change the level)."""
    rank = _rank() if rank is None else rank
    logger = logging.getLogger("megatron_ral")
    logger.setLevel(level)
    if not any(getattr(h, "_megatron_ral", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter(rank))
        handler._megatron_ral = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    return logger
