"""Console logging, progress bars and metrics sinks (metrics.jsonl, wandb offline, TensorBoard)."""

from megatron_ral.logging.console import setup_logging
from megatron_ral.logging.metrics import MetricsSink
from megatron_ral.logging.progress import progress

__all__ = ["MetricsSink", "progress", "setup_logging"]
