"""SIGTERM to a whole job step, as SLURM sends it: two training tasks started like ``srun`` starts them
(plain processes with the SLURM variables, no torchrun) with two data-loader workers each, the signal
sent to their process group (trainers and workers alike) after step 2. The step in progress finishes, a
checkpoint and the requeue marker are written, both tasks exit 0 and leave no process behind, and the
resubmitted job resumes to the same metrics as an uninterrupted run; the run directory and every
checkpoint keep the resolved configuration."""

from __future__ import annotations

import signal
import time

import pytest
import yaml

import trainer_fixture as tf
from megatron_ral.checkpoint.stop_marker import STOP_MARKER, read_stop_marker
from megatron_ral.testing.srun_tasks import SrunTasks

pytestmark = pytest.mark.distributed

STEPS = 4
SECTIONS = {"data": {"num_workers": 2, "prefetch_factor": 2}, "training": {"train_steps": STEPS},
            "checkpoint": {"save_interval": 0}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    return {"root": root, **tf.make_assets(root, "tiny")}


def _config(assets, name: str):
    root = assets["root"]
    return str(tf.write_config(root / f"{name}.yaml", assets, root / name, **SECTIONS)), root / name


@pytest.fixture
def launched():
    """Every job the test starts; whatever still runs when the test ends (a failure) is killed."""
    jobs: list[SrunTasks] = []
    yield jobs
    for tasks in jobs:
        if tasks.running():
            tasks.kill()


def _srun(assets, cfg: str, name: str, launched: list, env: dict | None = None) -> SrunTasks:
    tasks = SrunTasks.start_rendezvoused(tf.train_command(cfg), ntasks=2, env=env or tf.subprocess_env(),
                                         log_dir=assets["root"] / "logs", name=name)
    launched.append(tasks)
    return tasks


def _finish(tasks: SrunTasks, timeout: float = 600) -> None:
    codes = tasks.wait(timeout)
    logs = "\n".join(f"--- task {r}\n{tasks.log(r)[-3000:]}" for r in range(2))
    assert codes == [0, 0], logs
    assert "killed by signal" not in logs and "Traceback" not in logs, logs
    assert tasks.live_members() == [], f"processes of the job left behind:\n{logs}"


def _comparable(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows}


def test_group_sigterm_with_workers_saves_exits_0_and_resumes_equal(assets, launched):
    full_cfg, full_dir = _config(assets, "full")
    tasks = _srun(assets, full_cfg, "full", launched)
    _finish(tasks)
    full = _comparable(tf.read_metrics(full_dir))
    assert sorted(full) == list(range(1, STEPS + 1))
    assert not (full_dir / STOP_MARKER).exists()

    cfg, run_dir = _config(assets, "stopped")
    tasks = _srun(assets, cfg, "stopped", launched, env=tf.hold_env(run_dir, 2))   # the signal lands in step 3
    deadline = time.monotonic() + 600
    while not any(r["step"] >= 2 for r in tf.read_metrics(run_dir)):
        assert all(p.poll() is None for p in tasks.procs), tasks.log(0)[-3000:] + tasks.log(1)[-3000:]
        assert time.monotonic() < deadline, "no step 2 within 600 s"
        time.sleep(0.1)
    tasks.signal(signal.SIGTERM)                       # trainers and their data-loader workers
    _finish(tasks)
    stopped = _comparable(tf.read_metrics(run_dir))
    last = max(stopped)
    assert last == 3, f"the signal, sent in step 3, should stop the run there (stopped after step {last})"
    assert all("stopped by signal" in tasks.log(r) for r in range(2))
    ckpt = run_dir / "checkpoints" / f"iter_{last:07d}"
    assert ckpt.is_dir()
    marker = read_stop_marker(run_dir)
    assert marker is not None and marker["step"] == last and marker["total_steps"] == STEPS
    assert marker["reason"] == "SIGTERM" and marker["checkpoint"] == str(ckpt)

    # the resolved configuration, in the run directory and in the checkpoint
    from megatron_ral.config import load_config, to_dict

    expected = to_dict(load_config(cfg))
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == expected
    assert yaml.safe_load((ckpt / "run_config.yaml").read_text()) == expected
    assert to_dict(load_config(run_dir / "config.yaml")) == expected

    tasks = _srun(assets, cfg, "resumed", launched)                 # the resubmitted (requeued) job
    _finish(tasks)
    assert f"resumed from {ckpt}" in tasks.log(0)
    resumed = _comparable(tf.read_metrics(run_dir))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == full[step], f"step {step} differs after resuming at step {last}"
    assert read_stop_marker(run_dir) is None            # the finished run has no marker
    assert (run_dir / "checkpoints" / f"iter_{STEPS:07d}" / "run_config.yaml").is_file()
