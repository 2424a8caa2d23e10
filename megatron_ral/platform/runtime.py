"""Bring up torch.distributed and megatron-core's parallel state, on CUDA/NCCL or CPU/gloo."""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.errors import LayoutError
from megatron_ral.platform import cpu_compat
from megatron_ral.platform.devices import cuda_device_index
from megatron_ral.platform.launch_env import LaunchEnv, resolve_launch_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlatformInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str
    tensor_parallel: int
    pipeline_parallel: int
    context_parallel: int
    data_parallel: int
    cpu_compat: bool


_info: PlatformInfo | None = None


def device() -> torch.device:
    """The device this rank computes on (``cuda:i`` with i from ``devices.cuda_device_index``, or ``cpu``)."""
    if _info is not None:
        return _info.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def info() -> PlatformInfo:
    if _info is None:
        raise RuntimeError("megatron_ral.platform.initialize() has not been called")
    return _info


def is_initialized() -> bool:
    return _info is not None


def initialize(
    parallel: ParallelConfig | None = None,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: float | None = None,
    launch: LaunchEnv | None = None,
) -> PlatformInfo:
    """Initialise the process group, megatron parallel state and model-parallel RNG.

    Reads the launcher environment (torchrun, SLURM srun or none, see ``launch_env``). Without CUDA the
    CPU compatibility layer is installed and the backend is gloo; with CUDA the device is
    ``cuda:(local_rank % visible devices)`` (``devices.cuda_device_index``) and the backend NCCL. Calling it again with the same layout is a no-op.
    ``timeout_minutes`` defaults to ``MEGATRON_RAL_DIST_TIMEOUT_MIN`` or 30.
    """
    global _info
    from megatron.core import parallel_state, tensor_parallel

    parallel = parallel or ParallelConfig()
    tp, pp, cp = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.context_parallel_size)
    if _info is not None:
        if (_info.tensor_parallel, _info.pipeline_parallel, _info.context_parallel) != (tp, pp, cp):
            raise RuntimeError("platform already initialised with another parallel layout; call destroy() first")
        return _info

    launch = launch or resolve_launch_env()
    if launch.source == "slurm":
        # Code that reads RANK/LOCAL_RANK (loggers, data workers) sees the same as under torchrun. A
        # single process exports nothing: tools it starts later must not inherit a stale rendezvous.
        launch.export()
    cuda = torch.cuda.is_available()
    compat = False
    if cuda:
        dev = torch.device("cuda", cuda_device_index(launch.local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    else:
        compat = cpu_compat.install()
        # Advice about a CUDA environment variable, printed by megatron-core's linear layers: moot on CPU.
        warnings.filterwarnings("ignore", message=r"When using async grad allreduce")
        dev = torch.device("cpu")
    backend = backend or ("nccl" if cuda else "gloo")
    if timeout_minutes is None:
        timeout_minutes = float(os.environ.get("MEGATRON_RAL_DIST_TIMEOUT_MIN", "30"))

    if launch.world_size % (tp * pp * cp) != 0:
        raise LayoutError(
            f"world size {launch.world_size} is not divisible by TP*PP*CP = {tp}*{pp}*{cp} = {tp * pp * cp}"
        )
    if not dist.is_initialized():
        kwargs = {}
        if cuda and backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(
            backend=backend,
            # torchrun's workers must join its agent's store through env:// (TORCHELASTIC_USE_AGENT_STORE);
            # a lone process rendezvouses on its own port without exporting it.
            init_method=(f"tcp://{launch.master_addr}:{launch.master_port}" if launch.source == "single"
                         else "env://"),
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **kwargs,
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    _info = PlatformInfo(
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        device=dev,
        backend=backend,
        launcher=launch.source,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        context_parallel=cp,
        data_parallel=launch.world_size // (tp * pp * cp),
        cpu_compat=compat,
    )
    if launch.rank == 0:
        log.info(
            "platform: %s, backend=%s, world=%d (TP=%d PP=%d CP=%d DP=%d)%s",
            launch.source, backend, launch.world_size, tp, pp, cp, _info.data_parallel,
            ", CPU compatibility layer active" if compat else "",
        )
    return _info


def destroy() -> None:
    """Tear down megatron parallel state and the process group (safe to call twice)."""
    global _info
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _info = None
