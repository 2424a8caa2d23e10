"""One CUDA device rule for the model's ranks and the data path: local rank modulo the visible devices,
with the local rank read from torchrun's or SLURM's variables. Only the device count is mocked."""

from __future__ import annotations

import pytest
import torch

from megatron_ral.platform.devices import cuda_device_index, local_cuda_device
from megatron_ral.platform.launch_env import local_rank_from_env, resolve_launch_env

TORCHRUN = {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "MASTER_ADDR": "h1", "MASTER_PORT": "29500"}
SLURM = {"SLURM_PROCID": "15", "SLURM_NTASKS": "16", "SLURM_LOCALID": "7", "SLURM_JOB_NODELIST": "gpu[01-02]"}


@pytest.mark.parametrize("local_rank,count,expected", [
    (0, 8, 0), (7, 8, 7),      # all the node's GPUs visible: device = local rank
    (7, 1, 0), (3, 1, 0),      # srun --gpus-per-task 1: every task sees its own GPU as device 0
    (3, 2, 1), (6, 4, 2),      # k GPUs bound per task
])
def test_device_index_is_local_rank_modulo_visible_devices(local_rank, count, expected):
    assert cuda_device_index(local_rank, count) == expected


def test_no_visible_device_is_an_error_not_a_division_by_zero():
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        cuda_device_index(0, 0)


@pytest.mark.parametrize("env,count,expected", [
    (TORCHRUN, 8, 5),
    (TORCHRUN, 1, 0),
    (SLURM, 8, 7),
    (SLURM, 1, 0),                                        # the case that broke DALI: task 7 asked for device 7
    ({**SLURM, **TORCHRUN}, 8, 5),                        # torchrun inside an allocation wins, as for ranks
    ({k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}, 8, 0),
    ({"RANK": "3", "WORLD_SIZE": "4"}, 8, 3),             # a launcher without LOCAL_RANK: one node
    ({}, 8, 0),                                           # a single process
])
def test_local_device_from_launcher_variables(env, count, expected):
    assert local_cuda_device(env, device_count=count) == torch.device("cuda", expected)
    if env:  # the same local rank as the rendezvous sees
        assert local_rank_from_env(env) == resolve_launch_env(env).local_rank


def test_worker_process_resolves_the_same_device(monkeypatch):
    """A data-loader worker inherits the variables (initialize exports them under SLURM) and the
    visible devices, and resolves the device itself with the same rule."""
    from megatron_ral.platform.launch_env import LaunchEnv

    env: dict[str, str] = {}
    LaunchEnv(15, 16, 7, "gpu01", 20000, "slurm").export(env)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert local_cuda_device() == torch.device("cuda", 0)
