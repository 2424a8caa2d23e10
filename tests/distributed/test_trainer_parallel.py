"""Three RAL steps give the same rollouts and losses at every layout: TP=2, PP=2 (tied embeddings across
stages) and DP=2 against TP=1 (each with the default packing, shared-prompt groups), and the loss does not
depend on the micro-batch layout (padded micro-batches of one sequence)."""

from __future__ import annotations


import pytest

import trainer_fixture as tf
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return {"root": root, "tiny": tf.make_assets(root, "tiny"), "small": tf.make_assets(root, "small")}


def _run(assets, preset: str, name: str, world: int, overrides: list[str]) -> list[dict]:
    root = assets["root"]
    cfg = tf.write_config(root / f"{name}.yaml", assets[preset], root / name, checkpoint={"save_final": False})
    return run_distributed(tf.run_training, world, str(cfg), overrides, timeout=900)[0]


def _assert_same(ref: list[dict], got: list[dict], label: str) -> None:
    tf.assert_same_metrics(ref, got, 3, label)
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
