"""The checkpoint run directory (iter_N checkpoints, temporary saves, the latest pointer) and the per-rank RNG
state, without a distributed run."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from megatron_ral.checkpoint.convert import resolve_dist_dir
from megatron_ral.checkpoint.run_dir import (
    TRACKER_FILE,
    commit,
    complete_checkpoints,
    latest_checkpoint,
    prune,
    remove_stale,
    write_tracker,
)
from megatron_ral.checkpoint.safetensors_io import CheckpointFileError


def _fake_checkpoint(path, complete: bool = True):
    """The top-level files of a torch_dist checkpoint (what completeness is judged on)."""
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"x")
    if complete:
        for name in (".metadata", "metadata.json", "common.pt"):
            (path / name).write_bytes(b"x")
    return path


def test_latest_follows_pointer_and_ignores_temporary_saves(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None and latest_checkpoint(tmp_path) is None
    for step in (5, 10, 20):
        _fake_checkpoint(tmp_path / f"iter_{step:07d}")
    _fake_checkpoint(tmp_path / "iter_0000030.tmp")  # a save that wrote everything, then died before the rename
    _fake_checkpoint(tmp_path / "iter_0000040", complete=False)  # not a checkpoint
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [5, 10, 20]
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_0000020"  # no pointer: the newest complete one
    write_tracker(tmp_path, 10)
    assert (tmp_path / TRACKER_FILE).read_text() == "10\n"
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_0000010"  # the pointer wins (a resumed run)
    assert resolve_dist_dir(tmp_path) == tmp_path / "iter_0000010"  # the converters read the same
    write_tracker(tmp_path, 30)  # names the temporary save's step: not complete
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_0000020"
    (tmp_path / TRACKER_FILE).write_text("garbage")
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_0000020"
    assert not list(tmp_path.glob(f".{TRACKER_FILE}*"))  # no temporary pointer file left behind


def test_resolve_dist_dir_needs_a_complete_checkpoint(tmp_path):
    _fake_checkpoint(tmp_path / "iter_0000030.tmp")
    write_tracker(tmp_path, 30)
    with pytest.raises(CheckpointFileError, match="names '30'"):
        resolve_dist_dir(tmp_path)


def test_commit_replaces_same_step_and_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3, 9):
        _fake_checkpoint(tmp_path / f"iter_{step:07d}")
    tmp = _fake_checkpoint(tmp_path / "iter_0000003.tmp")
    (tmp / "new").write_text("x")
    _fake_checkpoint(tmp_path / "iter_0000007.tmp", complete=False)
    commit(tmp, tmp_path / "iter_0000003", 3)
    assert (tmp_path / "iter_0000003" / "new").is_file() and not tmp.exists()
    assert not (tmp_path / "iter_0000003.old").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_0000003"
    removed = prune(tmp_path, 3, keep_last=2)
    assert sorted(p.name for p in removed) == ["iter_0000001"]
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 3, 9]  # 9: another run's, not pruned at 3
    assert prune(tmp_path, 3, keep_last=1) == [tmp_path / "iter_0000002"]
    assert [p.name for p in remove_stale(tmp_path)] == ["iter_0000007.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "iter_0000009", TRACKER_FILE]


def test_rng_state_round_trip():
    from megatron_ral.checkpoint.rng_state import capture_rng_state, restore_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state()
    first = (random.random(), np.random.rand(3), torch.rand(3))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    restore_rng_state(state)
    again = (random.random(), np.random.rand(3), torch.rand(3))
    assert first[0] == again[0] and np.array_equal(first[1], again[1]) and torch.equal(first[2], again[2])
