"""examples/slurm/train.sbatch's requeue decision, run by bash with stand-ins for SLURM's commands: ``srun``
runs its command here (its options dropped), ``scontrol`` records its arguments, and a stand-in trainer
(``python -m megatron_ral.train``) finishes, stops early (writing the marker as the trainer does) or fails;
the state check is the real ``python -m megatron_ral.cli.run_state``. The trainer's own side (the marker
after a signal-triggered save) is tested in tests/distributed/test_preempt_workers.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "examples" / "slurm" / "train.sbatch"

pytestmark = pytest.mark.e2e

SRUN = """#!/bin/bash
while [[ "${1:-}" == -* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/bin/bash
echo "$*" >> "$SCONTROL_LOG"
"""
# python: the trainer is a stand-in (FAKE_TRAINER=finish|stop|fail); everything else is the real interpreter.
PYTHON = """#!/bin/bash
if [ "${1:-} ${2:-}" = "-m megatron_ral.train" ]; then
  case "$FAKE_TRAINER" in
    finish) exec "$REAL_PYTHON" -c 'import sys; from megatron_ral.checkpoint.stop_marker import clear_stop_marker; clear_stop_marker(sys.argv[1])' "$RUN_DIR" ;;
    stop) exec "$REAL_PYTHON" -c 'import sys; from megatron_ral.checkpoint.stop_marker import write_stop_marker; write_stop_marker(sys.argv[1], 3, 10, "SIGTERM")' "$RUN_DIR" ;;
    fail) echo "megatron-ral-train: error: data.train_files: no such file" >&2; exit 2 ;;
  esac
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.fixture
def job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python", PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text(f"training:\n  run_dir: {tmp_path / 'elsewhere'}\n")   # the override below wins

    def submit(trainer: str, restarts: int = 0) -> tuple[subprocess.CompletedProcess, list[str]]:
        log = tmp_path / "scontrol.log"
        log.unlink(missing_ok=True)
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", REAL_PYTHON=sys.executable,
                   FAKE_TRAINER=trainer, RUN_DIR=str(run_dir), SCONTROL_LOG=str(log), SLURM_JOB_ID="4242",
                   SLURM_RESTART_COUNT=str(restarts), MAX_REQUEUES="2",
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
        out = subprocess.run(["bash", str(SBATCH), str(config), f"training.run_dir={run_dir}"], env=env,
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        return out, (log.read_text().splitlines() if log.is_file() else [])

    return submit, run_dir


def test_stopped_early_is_requeued(job):
    submit, run_dir = job
    out, calls = submit("stop")
    assert out.returncode == 0, out.stderr
    assert calls == ["requeue 4242"]
    assert json.loads((run_dir / "STOPPED_EARLY").read_text())["step"] == 3


def test_finished_run_is_not_requeued(job):
    submit, run_dir = job
    submit("stop")
    out, calls = submit("finish")                    # the requeued job finishes: the marker is gone
    assert out.returncode == 0, out.stderr
    assert calls == [] and not (run_dir / "STOPPED_EARLY").exists()


def test_failed_run_is_not_requeued(job):
    submit, run_dir = job
    submit("stop")                                   # a marker from the previous job
    out, calls = submit("fail")
    assert out.returncode == 2 and calls == []
    assert "data.train_files" in out.stderr


def test_requeues_are_bounded(job):
    submit, _ = job
    out, calls = submit("stop", restarts=2)
    assert out.returncode == 0 and calls == []
    assert "not requeued" in out.stdout and "MAX_REQUEUES" in out.stdout


def test_run_state_command(tmp_path):
    from megatron_ral.checkpoint.stop_marker import write_stop_marker

    def run(*args):
        return subprocess.run([sys.executable, "-m", "megatron_ral.cli.run_state", *args], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))

    run_dir = tmp_path / "run"
    out = run("--run-dir", str(run_dir), "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == {"run_dir": str(run_dir), "state": "done",
                                                               "stopped_early": None}
    write_stop_marker(run_dir, 5, 9, "SIGTERM")
    got = json.loads(run("--run-dir", str(run_dir), "--json").stdout)
    assert got["state"] == "requeue" and got["stopped_early"]["step"] == 5
    assert run(f"training.run_dir={run_dir}").stdout == "requeue\n"          # the trainer's overrides
    bad = run("--run-dir", str(run_dir), "training.train_steps=3")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--run-dir" in bad.stderr
    bad = run("--config", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr and "Traceback" not in bad.stderr
