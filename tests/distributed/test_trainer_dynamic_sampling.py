"""Dynamic sampling in real trainer runs (tiny model, CPU): with a reward that gives exactly the odd records'
groups zero variance, every step draws rounds of 4 prompts until it holds 4 informative groups (at most 3
rounds), drops exactly the zero-variance groups (and the surplus), and logs adv/groups_drawn and
adv/groups_dropped; the run at DP=2 gives the metrics of DP=1; a run stopped after 2 steps and resumed gives
the uninterrupted run's metrics bit for bit (loader position and RNG streams checkpointed with the extra
draws)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

import trainer_fixture as tf
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

P, ROUNDS, STEPS = 4, 3, 4
DYNAMIC = {"dynamic_sampling": True, "max_sampling_rounds": ROUNDS,
           "reward_function": "trainer_fixture:even_records_only"}
EXACT = ("adv/groups_drawn", "adv/groups_dropped", "adv/sampling_rounds", "adv/zero_std_groups")
# computed directly: 1e-5 relative; the policy loss is a sum of +-A terms cancelling to ~1e-3 of their size
TOLERANCES = (("loss/policy", 1e-5, 1e-5), ("loss/total", 1e-5, 1e-5), ("loss/kl", 1e-5, 1e-9),
              ("loss/attn", 1e-5, 1e-9), ("attn/jsd_old", 1e-5, 1e-7), ("attn/entropy", 1e-5, 0.0),
              ("train/grad_norm", 1e-5, 0.0), ("rollout/logprob_diff_mean", 0.0, 1e-6))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynsamp")
    # 18 records -> 16 training records: an epoch is a whole number of 4-prompt rounds at DP=1 and DP=2
    return {"root": root, **tf.make_assets(root, "tiny", n_records=18)}


def _config(assets, name: str, **training) -> tuple[str, Path]:
    root = assets["root"]
    cfg = tf.write_config(root / f"{name}.yaml", assets, root / name, algorithm=DYNAMIC,
                          training={"train_steps": STEPS, **training})
    return str(cfg), root / name


def _train(cfg: str, *overrides: str) -> str:
    out = subprocess.run(tf.train_command(cfg, *overrides), env=tf.subprocess_env(), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def _expected(assets) -> list[dict]:
    """Each step's counts, from the record order (no shuffling): rounds of 4 records while fewer than 4
    even (informative) records were drawn, at most 3 rounds."""
    ids = [int(r["problem_id"]) for r in json.load(open(Path(assets["data"]) / "train.json"))]
    assert len(ids) == 16
    cursor, out = 0, []
    for _ in range(STEPS):
        drawn, informative, rounds = [], 0, 0
        while True:
            batch = [ids[(cursor + i) % len(ids)] for i in range(P)]
            cursor += P
            drawn += batch
            rounds += 1
            informative = sum(i % 2 == 0 for i in drawn)
            if informative >= P or rounds == ROUNDS:
                break
        out.append({"adv/groups_drawn": len(drawn), "adv/groups_dropped": len(drawn) - min(informative, P),
                    "adv/sampling_rounds": rounds, "adv/zero_std_groups": sum(i % 2 for i in drawn)})
    return out


def _comparable(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows}


@pytest.fixture(scope="module")
def full(assets):
    cfg, run_dir = _config(assets, "full")
    _train(cfg, "checkpoint.save_final=false")
    return tf.read_metrics(run_dir)


def test_drops_exactly_the_zero_variance_groups_and_refills(assets, full):
    expected = _expected(assets)
    assert [r["step"] for r in full] == list(range(1, STEPS + 1))
    for row, want in zip(full, expected):
        assert {k: row[k] for k in EXACT} == want, row["step"]
    assert any(w["adv/sampling_rounds"] > 1 for w in expected), "no step refilled: the test would be vacuous"
    for row in full:
        assert math.isfinite(row["loss/total"]) and row["train/skipped_updates"] == 0
        assert row["rollout/logprob_diff_max"] < 1e-5


def test_dp2_matches_dp1(assets, full):
    cfg, _ = _config(assets, "dp2")
    rows = run_distributed(tf.run_training, 2, cfg, ["checkpoint.save_final=false"], timeout=900)[0]
    for a, b in zip(full, rows):
        for k in EXACT:
            assert a[k] == b[k], f"step {a['step']} {k}: {a[k]} != {b[k]}"
    tf.assert_same_metrics(full, rows, STEPS, tolerances=TOLERANCES)


def test_resume_is_bit_exact(assets, full):
    cfg, run_dir = _config(assets, "resumed")
    _train(cfg, "training.train_steps=2")                 # stops after step 2 with a checkpoint
    err = _train(cfg)                                     # resumes at step 3
    assert "resumed from" in err
    resumed = _comparable(tf.read_metrics(run_dir))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    ref = _comparable(full)
    for step in range(1, STEPS + 1):
        assert resumed[step] == ref[step], f"step {step} differs after resuming at step 2"
