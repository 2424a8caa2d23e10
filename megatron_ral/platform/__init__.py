"""Device, torch.distributed and megatron-core parallel state bring-up (CUDA/NCCL or CPU/gloo).

    from megatron_ral.platform import initialize, destroy, device
    initialize(ParallelConfig(tensor_model_parallel_size=2), seed=1234)

See ``cpu_compat`` for what changes on a machine without CUDA (nothing changes with CUDA present),
``launch_env`` for torchrun / SLURM variables, and ``spawn`` for multi-process tests on loopback.
"""

from megatron_ral.platform.runtime import PlatformInfo, destroy, device, info, initialize, is_initialized

__all__ = ["PlatformInfo", "destroy", "device", "info", "initialize", "is_initialized"]
