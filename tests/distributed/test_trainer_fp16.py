"""model.dtype fp16 trains, saves and resumes: the loss scaler's overflows skip updates without stopping
the run, and a run resumed from a checkpoint repeats the uninterrupted run's steps bit for bit, loss scale
included (the scaler's scale and hysteresis come back with the optimizer state)."""

from __future__ import annotations

import subprocess

import pytest

import trainer_fixture as tf

pytestmark = pytest.mark.distributed

# 2^24 overflows the tiny model's fp16 gradients: the first steps' updates are all skipped while the scale
# backs off (measured: 2^23 after step 1, 2^21 after step 2, then one overflow and one update in step 3)
FP16 = {"model": {"dtype": "fp16"}, "optimizer": {"initial_loss_scale": 2.0**24},
        "training": {"max_consecutive_skips": 1}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    return {"root": root, **tf.make_assets(root, "tiny")}


def _train(assets, name: str, steps: int, save_final: bool) -> list[dict]:
    root = assets["root"]
    sections = {k: dict(v) for k, v in FP16.items()}
    sections["training"]["train_steps"] = steps
    cfg = tf.write_config(root / f"{name}_{steps}.yaml", assets, root / name, checkpoint={"save_final": save_final},
                          **sections)
    out = subprocess.run(tf.train_command(str(cfg)), env=tf.subprocess_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = tf.read_metrics(root / name)
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows}


def test_fp16_overflows_skip_updates_and_a_resumed_run_is_bit_exact(assets):
    full = _train(assets, "full", 4, save_final=False)
    assert sorted(full) == [1, 2, 3, 4]
    assert all(r["train/skipped_updates"] == 0 for r in full.values())   # overflows are not failures ...
    assert full[1]["train/loss_scale_skips"] == 2 and full[1]["train/loss_scale"] == 2.0**23
    assert full[2]["train/loss_scale"] < full[1]["train/loss_scale"]      # ... the scale backs off
    assert full[4]["train/loss_scale_skips"] < 2                          # and updates happen
    assert full[4]["loss/policy"] != 0.0

    first = _train(assets, "resumed", 2, save_final=True)                   # checkpoint at step 2
    assert (assets["root"] / "resumed" / "checkpoints" / "iter_0000002").is_dir()
    resumed = _train(assets, "resumed", 4, save_final=True)                 # resumes after step 2
    assert sorted(first) == [1, 2] and sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert resumed[step] == full[step], f"step {step} differs after resuming at step 2"
