import pytest

from megatron_ral.platform.launch_env import first_slurm_host, resolve_launch_env


@pytest.mark.parametrize("nodelist,first", [
    ("gpu001", "gpu001"),
    ("gpu[003-005,9],cpu1", "gpu003"),
    ("node[07,1-2]", "node07"),
    ("a1,b2", "a1"),
    ("r[1-2]-n[08-09]", "r1-n08"),
    ("dgx-a100-[0010-0012]", "dgx-a100-0010"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_slurm_variables_map_to_torch_distributed():
    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
           "SLURM_JOB_NODELIST": "h100-[04-05]", "SLURM_JOB_ID": "123456"}
    le = resolve_launch_env(env)
    assert (le.rank, le.world_size, le.local_rank, le.master_addr, le.source) == (13, 16, 5, "h100-04", "slurm")
    assert le.master_port == 20000 + 123456 % 20000
    out = {}
    le.export(out)
    assert out == {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "MASTER_ADDR": "h100-04",
                   "MASTER_PORT": str(le.master_port)}


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "2345",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "x"}
    le = resolve_launch_env(env)
    assert (le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port, le.source) == (
        1, 2, 1, "10.0.0.1", 2345, "torchrun")


def test_slurm_master_port_and_addr_from_env_are_respected():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n[1-2]", "MASTER_PORT": "4000",
           "MASTER_ADDR": "n2"}
    le = resolve_launch_env(env)
    assert (le.master_addr, le.master_port, le.local_rank) == ("n2", 4000, 0)


def test_no_launcher_is_single_process():
    le = resolve_launch_env({})
    assert (le.rank, le.world_size, le.source, le.master_addr) == (0, 1, "single", "127.0.0.1")
    assert 0 < le.master_port < 65536


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="SLURM_NTASKS"):
        resolve_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "two", "SLURM_NODELIST": "a"})
    with pytest.raises(ValueError, match="NODELIST"):
        resolve_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_single_process_initialize_leaves_no_rendezvous_in_env(monkeypatch):
    """Tools started by a process that initialised itself alone must not inherit its port."""
    from megatron_ral.platform import destroy, initialize

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    import os

    initialize()
    try:
        assert not any(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_PORT"))
    finally:
        destroy()
