"""Which CUDA device a process uses: one rule for the model's ranks and the data path's decoders.

A process sees the GPUs its launcher left visible. Under torchrun, or srun with the node's GPUs all
visible, local rank r uses device r. Under per-task GPU binding (``srun --gpus-per-task 1``, or
``CUDA_VISIBLE_DEVICES`` set per task) each task sees only its own GPU, as device 0, whatever its
local rank. ``local_rank % device_count`` is right in both cases (and for k GPUs bound per task).

``platform.initialize`` sets this device for the rank; the DALI video decoder sets the same device in
every process it runs in (data-loader workers are separate processes and do not inherit the parent's
``torch.cuda.set_device``; they do inherit the launcher's environment variables).
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from megatron_ral.platform.launch_env import local_rank_from_env


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """Index of this process's device among the ``device_count`` CUDA devices it can see."""
    if device_count < 1:
        raise RuntimeError("no CUDA device is visible to this process (check CUDA_VISIBLE_DEVICES and the "
                           "launcher's GPU binding)")
    if local_rank < 0:
        raise ValueError(f"local rank must be >= 0, got {local_rank}")
    return local_rank % device_count


def local_cuda_device(environ: Mapping[str, str] | None = None, device_count: int | None = None) -> torch.device:
    """``cuda:i`` for this process: the local rank from the launcher's variables (``LOCAL_RANK``, else
    ``SLURM_LOCALID``) modulo the number of visible devices (``torch.cuda.device_count()`` unless given)."""
    environ = os.environ if environ is None else environ
    count = torch.cuda.device_count() if device_count is None else device_count
    return torch.device("cuda", cuda_device_index(local_rank_from_env(environ), count))
