"""Device, torch.distributed and megatron-core parallel state bring-up (CUDA/NCCL or CPU/gloo).

    from megatron_ral.platform import initialize, destroy, device
    initialize(ParallelConfig(tensor_model_parallel_size=2), seed=1234)

See ``cpu_compat`` for what changes on a machine without CUDA (nothing changes with CUDA present),
and ``launch_env`` for torchrun / SLURM variables (the multi-process test spawner is
``megatron_ral.testing.spawn``).
The names below are imported on first use, so ``megatron_ral.platform.launch_env`` (read by the
tools before they load anything heavy) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["PlatformInfo", "destroy", "device", "info", "initialize", "is_initialized"]

if TYPE_CHECKING:
    from megatron_ral.platform.runtime import PlatformInfo, destroy, device, info, initialize, is_initialized


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("megatron_ral.platform.runtime"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
