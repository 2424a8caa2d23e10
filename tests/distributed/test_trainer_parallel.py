"""Three RAL steps give the same rollouts and losses at every layout: TP=2, PP=2 (tied embeddings across
stages) and DP=2 against TP=1 (each with the default packing, shared-prompt groups), and the loss does not
depend on the micro-batch layout (padded micro-batches of one sequence)."""

from __future__ import annotations

import math

import pytest

import trainer_fixture as tf
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

SAME_ROLLOUT = ("reward/total", "reward/accuracy", "response/length_mean")
# (metric, relative tolerance, absolute tolerance). Quantities computed directly agree to 1e-5 relative.
# The policy and attention losses are sums of +-A_i terms (group-normalised advantages sum to zero per
# group) that cancel to ~1e-3 of the terms' size; they are compared to 1e-5 of the terms' scale (|A| ~ 1
# for the policy term, |A| x JSD ~ 1e-4 for the attention term), which float32 rounding meets with ~10x margin
# (measured differences: policy <= 2e-7, attention <= 2e-9, jsd_old <= 8e-9).
TOLERANCES = (
    ("loss/policy", 1e-5, 1e-5), ("loss/total", 1e-5, 1e-5), ("loss/kl", 1e-5, 1e-9),
    ("loss/attn", 1e-5, 1e-9), ("attn/jsd_old", 1e-5, 1e-7), ("attn/entropy", 1e-5, 0.0),
    ("attn/vision_mass", 1e-5, 0.0), ("train/grad_norm", 1e-5, 0.0),
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return {"root": root, "tiny": tf.make_assets(root, "tiny"), "small": tf.make_assets(root, "small")}


def _run(assets, preset: str, name: str, world: int, overrides: list[str]) -> list[dict]:
    root = assets["root"]
    cfg = tf.write_config(root / f"{name}.yaml", assets[preset], root / name, checkpoint={"save_final": False})
    return run_distributed(tf.run_training, world, str(cfg), overrides, timeout=900)[0]


def _assert_same(ref: list[dict], got: list[dict], label: str) -> None:
    assert len(ref) == len(got) == 3, (len(ref), len(got))
    for a, b in zip(ref, got):
        for k in SAME_ROLLOUT:  # equal up to the order of a float64 sum over ranks
            assert math.isclose(a[k], b[k], rel_tol=1e-12), f"{label} step {a['step']} {k}: {a[k]} != {b[k]} (rollouts differ)"
        for k, rel, tol in TOLERANCES:
            assert math.isclose(a[k], b[k], rel_tol=rel, abs_tol=tol), f"{label} step {a['step']} {k}: {a[k]} vs {b[k]}"
    assert any(abs(r["loss/attn"]) > 1e-7 for r in ref), "the attention term never acted: the test would be vacuous"
    assert any(abs(r["loss/policy"]) > 1e-5 for r in ref)


def test_tp2_and_dp2_and_micro_batch_size_match_tp1(assets):
    ref = _run(assets, "tiny", "tp1", 1, [])
    _assert_same(ref, _run(assets, "tiny", "tp2", 2, ["parallel.tensor_model_parallel_size=2"]), "TP=2")
    _assert_same(ref, _run(assets, "tiny", "dp2", 2, []), "DP=2")
    # the default packing (shared-prompt groups) against padded micro-batches of one sequence
    _assert_same(ref, _run(assets, "tiny", "mbs1", 1, ["training.packing=none", "training.micro_batch_size=1"]),
                 "padded, micro_batch_size=1")


def test_pp2_tied_embeddings_match_tp1(assets):
    ref = _run(assets, "small", "small_tp1", 1, [])
    _assert_same(ref, _run(assets, "small", "small_pp2", 2, ["parallel.pipeline_model_parallel_size=2"]), "PP=2")
