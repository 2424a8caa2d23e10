"""Checkpoint, SIGTERM and resume of the trainer: a run stopped by SIGTERM saves, exits 0, and the resumed
run's metrics equal the uninterrupted run's bit for bit; non-finite steps are skipped and, too many in a
row, stop the run with one line while the last good checkpoint stays loadable."""

from __future__ import annotations

import math
import signal
import subprocess
import time

import pytest

import trainer_fixture as tf

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"root": root, **tf.make_assets(root, "tiny")}


def _config(assets, name: str, **sections):
    root = assets["root"]
    return str(tf.write_config(root / f"{name}.yaml", assets, root / name, **sections)), root / name


def _comparable(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows}


def test_sigterm_saves_and_resume_is_bit_exact(assets):
    steps = {"training": {"train_steps": 5}, "checkpoint": {"save_interval": 0}}
    full_cfg, full_dir = _config(assets, "full", **steps)
    subprocess.run(tf.train_command(full_cfg), env=tf.subprocess_env(), check=True, capture_output=True, timeout=600)
    full = _comparable(tf.read_metrics(full_dir))
    assert sorted(full) == [1, 2, 3, 4, 5]

    cfg, run_dir = _config(assets, "stopped", **steps)
    proc = subprocess.Popen(tf.train_command(cfg), env=tf.hold_env(run_dir, 2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not any(r["step"] >= 2 for r in tf.read_metrics(run_dir)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    stopped = _comparable(tf.read_metrics(run_dir))
    last = max(stopped)
    assert last == 3, f"the signal, sent in step 3, should stop the run there (stopped after step {last})"
    assert (run_dir / "checkpoints" / f"iter_{last:07d}").is_dir()
    assert "stopped by signal" in err

    done = subprocess.run(tf.train_command(cfg), env=tf.subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr
    resumed = _comparable(tf.read_metrics(run_dir))
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        assert resumed[step] == full[step], f"step {step} differs after resuming at step {last}"


def test_nonfinite_steps_are_skipped_then_stop_the_run(assets):
    cfg, run_dir = _config(
        assets, "nan", algorithm={"reward_function": "trainer_fixture:nan_after_first_step"},
        training={"train_steps": 6, "max_consecutive_skips": 2}, checkpoint={"save_interval": 1})
    out = subprocess.run(tf.train_command(cfg), env=tf.subprocess_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("megatron-ral-train: error:")]
    assert len(errors) == 1 and "max_consecutive_skips" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    rows = tf.read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]      # step 3's failure stops the run before it is logged
    assert rows[0]["train/skipped_updates"] == 0 and rows[1]["train/skipped_updates"] == 2
    # the last good checkpoint (step 1; step 2 made no update and was not saved over it) stays loadable
    from megatron_ral.checkpoint.training import TrainCheckpointer

    info = TrainCheckpointer(run_dir / "checkpoints").peek()
    assert info.step in (1, 2)


def test_resume_at_another_layout_continues(assets):
    """Two steps at TP=1, then the same run continued at TP=2 (2 ranks) for a third step."""
    from megatron_ral.testing.spawn import run_distributed

    cfg, run_dir = _config(assets, "relayout", training={"train_steps": 2})
    subprocess.run(tf.train_command(cfg), env=tf.subprocess_env(), check=True, capture_output=True, timeout=600)
    first = tf.read_metrics(run_dir)
    rows = run_distributed(tf.run_training, 2, cfg, ["training.train_steps=3", "parallel.tensor_model_parallel_size=2"],
                           timeout=900)[0]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[:2] == first
    assert math.isfinite(rows[2]["loss/total"]) and rows[2]["train/skipped_updates"] == 0
    assert (run_dir / "checkpoints" / "iter_0000003").is_dir()
