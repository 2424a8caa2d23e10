"""The run directory's own files: the requeue marker's lifecycle (written on a signal stop, read by the job
script's check, removed when a run starts) and the kept resolved configuration (loads back to the same
configuration)."""

from __future__ import annotations

import json

import yaml

from megatron_ral.checkpoint.run_config import (
    CHECKPOINT_CONFIG,
    RUN_CONFIG,
    find_run_config,
    write_checkpoint_config,
    write_run_config,
)
from megatron_ral.checkpoint.stop_marker import STOP_MARKER, clear_stop_marker, read_stop_marker, write_stop_marker
from megatron_ral.config import load_config, to_dict


def test_marker_lifecycle(tmp_path):
    run = tmp_path / "run"
    assert read_stop_marker(run) is None and clear_stop_marker(run) is False      # nothing yet
    path = write_stop_marker(run, 7, 20, "SIGTERM", run / "checkpoints" / "iter_0000007")
    assert path == run / STOP_MARKER
    body = read_stop_marker(run)
    assert {k: body[k] for k in ("step", "total_steps", "reason", "checkpoint")} == {
        "step": 7, "total_steps": 20, "reason": "SIGTERM", "checkpoint": str(run / "checkpoints" / "iter_0000007")}
    assert json.loads(path.read_text()) == body and body["time"]
    write_stop_marker(run, 9, 20, "SIGUSR1")                                     # a later stop replaces it
    assert read_stop_marker(run)["step"] == 9 and read_stop_marker(run)["checkpoint"] is None
    assert [p.name for p in run.iterdir()] == [STOP_MARKER]                     # no temporary left
    assert clear_stop_marker(run) is True and read_stop_marker(run) is None      # the next run starts
    (run / STOP_MARKER).write_text("stopped\n")                                  # hand-made: still a marker
    assert read_stop_marker(run) == {"reason": "unreadable marker"}


def test_run_config_round_trip(tmp_path):
    cfg = load_config(None, ["training.train_steps=7", "algorithm.lambda_attn=0.5", "data.num_workers=3",
                             "training.run_dir=" + str(tmp_path / "run")])
    path = write_run_config(tmp_path / "run", to_dict(cfg))
    assert path == tmp_path / "run" / RUN_CONFIG
    assert load_config(path) == cfg                                               # rebuilds the same config
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)
    assert list(yaml.safe_load(path.read_text())) == list(to_dict(cfg))          # sections in declared order

    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000002"
    ckpt.mkdir(parents=True)
    assert find_run_config(ckpt) == path                                          # none of its own: the run's
    other = to_dict(load_config(None, ["training.train_steps=9"]))
    write_checkpoint_config(ckpt, other)
    assert find_run_config(ckpt) == ckpt / CHECKPOINT_CONFIG                      # the checkpoint's own first
    assert load_config(find_run_config(ckpt)).training.train_steps == 9
    assert find_run_config(tmp_path / "run") == path
    assert find_run_config(tmp_path / "run" / "checkpoints") == path              # a save dir: its run's
    assert find_run_config(tmp_path / "elsewhere") is None
    assert find_run_config(tmp_path / "run" / "checkpoints" / "iter_0000002" / "x") is None  # no walking up
