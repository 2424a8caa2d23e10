"""Rollout/trainer log-prob consistency in real trainer runs (CPU, fp32): the generator's log-probs equal the
old pass's (RAL, two updates) and the single update's first forward (GRPO, one update) to < 1e-5 on every
step, both metrics are logged every step, and the warning fires exactly once when its threshold is tiny."""

from __future__ import annotations

import subprocess

import pytest

import trainer_fixture as tf

pytestmark = pytest.mark.distributed

KEYS = ("rollout/logprob_diff_max", "rollout/logprob_diff_mean")
WARNING = "exceeds algorithm.logprob_diff_warn"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency")
    return {"root": root, **tf.make_assets(root, "tiny")}


def _train(assets, name: str, **sections) -> tuple[list[dict], str]:
    root = assets["root"]
    cfg = tf.write_config(root / f"{name}.yaml", assets, root / name, checkpoint={"save_final": False}, **sections)
    out = subprocess.run(tf.train_command(str(cfg)), env=tf.subprocess_env(), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return tf.read_metrics(root / name), out.stderr


def _assert_consistent(rows: list[dict], steps: int) -> None:
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert all(k in r for k in KEYS), sorted(r)
        assert 0.0 <= r["rollout/logprob_diff_mean"] <= r["rollout/logprob_diff_max"] < 1e-5, r


def test_old_pass_matches_generation_and_the_warning_fires_once(assets):
    rows, err = _train(assets, "ral", algorithm={"logprob_diff_warn": 1e-12})
    _assert_consistent(rows, 3)
    assert any(r["rollout/logprob_diff_max"] > 1e-12 for r in rows)
    assert err.count(WARNING) == 1, err[-3000:]


def test_single_update_compares_its_first_forward(assets):
    rows, err = _train(assets, "grpo1", algorithm={"name": "grpo", "updates_per_rollout": 1, "lambda_attn": 0.0},
                       training={"train_steps": 2})
    _assert_consistent(rows, 2)
    assert WARNING not in err                     # the fp32 default threshold (1e-3) is far above the figure
