"""Metrics sinks: ``RUN_DIR/metrics.jsonl`` always (one JSON object per step, with ``step``), wandb in
offline mode by default (``WANDB_MODE`` wins when set; nothing ever needs the network), TensorBoard
scalars optionally. Only rank 0 writes; other ranks' calls are no-ops."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from megatron_ral.config.schema import LoggingConfig

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (float("inf") if value > 0 else float("-inf"))
    return value


def _drop_import_telemetry() -> None:
    """Remove wandb's import hooks: they report which libraries the process imports (telemetry this project does
    not send) and talk to wandb's service on every such import; once SLURM's SIGTERM has ended that service, a
    later import (transformers while a checkpoint is saved) would raise inside the trainer."""
    try:
        from wandb.sdk.lib.import_hooks import unregister_all_post_import_hooks
    except ImportError:
        return
    unregister_all_post_import_hooks()


class MetricsSink:
    """``log(step, {"reward/total": ..., ...})`` to every configured sink; ``close()`` at the end."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, run_config: Mapping[str, Any] | None = None,
                 rank: int | None = None) -> None:
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._wandb = None
        self._wandb_started = False
        self._tb = None
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        mode = os.environ.get("WANDB_MODE") or cfg.wandb_mode
        if mode != "disabled":
            self._wandb = self._start_wandb(cfg, mode, run_config)
        if cfg.tensorboard:
            self._tb = self._start_tensorboard()

    def _start_wandb(self, cfg: LoggingConfig, mode: str, run_config: Mapping[str, Any] | None):
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed; metrics go to metrics.jsonl only")
            return None
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            run = wandb.init(project=cfg.wandb_project, name=cfg.run_name or None, mode=mode,
                             dir=str(self.run_dir), config=dict(run_config or {}), reinit=True)
        except Exception as e:  # noqa: BLE001 - a logging sink must not stop training
            log.warning("wandb could not start (%s); metrics go to metrics.jsonl only", e)
            return None
        _drop_import_telemetry()
        self._wandb_started = True
        return run

    def _start_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed (pip install tensorboard); skipping TensorBoard scalars")
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.rank != 0:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._guard_wandb("log", lambda: self._wandb.log({k: v for k, v in record.items() if k != "step"},
                                                             step=int(step)))
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, int(step))

    def _guard_wandb(self, what: str, call) -> None:
        """A wandb call that fails (e.g. its service process was ended by the job step's SIGTERM, which SLURM
        sends to every process of the step) drops the wandb sink with one warning: metrics.jsonl goes on, and
        a preempted run still saves and exits 0."""
        try:
            call()
        except Exception as e:  # noqa: BLE001 - a logging sink must not stop training or its checkpoint
            log.warning("wandb %s failed (%s: %s); metrics go to metrics.jsonl only from here",
                        what, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self._wandb = None

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._guard_wandb("finish", self._wandb.finish)
            self._wandb = None
        if self._wandb_started:
            # wandb otherwise tears its service down in an atexit hook, which prints a traceback when SLURM's
            # SIGTERM has already ended that service; here the same failure is one warning
            import wandb

            self._wandb_started = False
            self._guard_wandb("teardown", wandb.teardown)
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsSink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
