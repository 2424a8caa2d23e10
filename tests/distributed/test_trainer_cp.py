"""Two RAL trainer steps at context parallelism CP=2 (two gloo ranks splitting every training sequence; the two
ranks share the rollouts out as two generators) give the CP=1 metrics: the same rollouts (rewards, lengths),
the same losses (policy, KL, attention), attention diagnostics and gradient norm. The synthetic video prompts
have sequence lengths of every parity (the model pads those that are not multiples of 2C)."""

from __future__ import annotations


import pytest

import trainer_fixture as tf
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

def _run(root, assets, name: str, world: int, overrides: list[str]) -> list[dict]:
    cfg = tf.write_config(root / f"{name}.yaml", assets, root / name, checkpoint={"save_final": False},
                          training={"prompts_per_step": 4, "micro_batch_size": 2, "train_steps": 2,
                                    "run_dir": str(root / name), "eval_at_end": False})
    return run_distributed(tf.run_training, world, str(cfg), overrides, timeout=900)[0]


@pytest.mark.parametrize("packing", ["none", "sequences"])
def test_ral_steps_at_cp2_match_cp1(tmp_path_factory, packing):
    """CP=1 with padded micro-batches against CP=2 with padded micro-batches or packed streams (the streams'
    tails padded to a multiple of 2C)."""
    root = tmp_path_factory.mktemp("trainer_cp")
    assets = tf.make_assets(root, "tiny")
    ref = _run(root, assets, "cp1", 1, ["training.packing=none"])
    got = _run(root, assets, "cp2", 2, ["parallel.context_parallel_size=2", f"training.packing={packing}"])
    tf.assert_same_metrics(ref, got, 2)
    assert any(abs(r["loss/attn"]) > 1e-7 for r in ref), "the attention term never acted: the test would be vacuous"
    assert any(abs(r["loss/policy"]) > 1e-5 for r in ref)


def test_pp2_cp2_tied_embeddings_match_cp1(tmp_path_factory):
    """Pipeline stages under CP: each stage's ranks split the sequence, the stages exchange their shares."""
    root = tmp_path_factory.mktemp("trainer_pp_cp")
    assets = tf.make_assets(root, "small")
    ref = _run(root, assets, "small_cp1", 1, [])
    got = _run(root, assets, "small_pp2_cp2", 4, ["parallel.context_parallel_size=2",
                                                   "parallel.pipeline_model_parallel_size=2"])
    tf.assert_same_metrics(ref, got, 2)


def test_cp2_resume_is_bit_exact(tmp_path_factory):
    """A CP=2 run saved after step 2 (dist checkpoint with the optimizer sharded over DP x CP) and resumed for
    step 3 gives the uninterrupted run's metrics bit for bit."""
    root = tmp_path_factory.mktemp("trainer_cp_resume")
    assets = tf.make_assets(root, "tiny")
    cp = ["parallel.context_parallel_size=2"]

    def run(name: str, steps: int, run_dir: str) -> list[dict]:
        cfg = tf.write_config(root / f"{name}.yaml", assets, root / run_dir,
                              training={"prompts_per_step": 4, "micro_batch_size": 2, "train_steps": steps,
                                        "run_dir": str(root / run_dir), "eval_at_end": False},
                              checkpoint={"save_interval": 0, "save_final": True})
        return run_distributed(tf.run_training, 2, str(cfg), cp, timeout=900)[0]

    full = run("full", 3, "full")
    run("part", 2, "part")
    resumed = run("resumed", 3, "part")

    def comparable(rows):
        return {r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows}

    full, resumed = comparable(full), comparable(resumed)
    assert sorted(full) == sorted(resumed) == [1, 2, 3]
    assert resumed[3] == full[3]


def test_ral_distill_steps_at_cp2_match_cp1(tmp_path_factory):
    """The teacher follows the student's path under CP (its sequence split, its vision frames shared out, its
    rows dealt out like the student's, its response logits put together for GKD): the distillation terms and
    metrics at CP=2 equal CP=1's."""
    root = tmp_path_factory.mktemp("trainer_cp_distill")
    student, teacher = tf.make_assets(root, "tiny"), tf.make_assets(root, "small", seed=3)
    distill = {"name": "ral_distill", "gkd_mu": 0.2, "gamma_attn": 5.0, "lambda_attn": 1.0, "kl_beta": 0.04,
               "teacher_load": teacher["mcore"]}

    def run(name: str, world: int, overrides: list[str]) -> list[dict]:
        cfg = tf.write_config(root / f"{name}.yaml", student, root / name, algorithm=distill,
                              checkpoint={"save_final": False},
                              training={"prompts_per_step": 4, "micro_batch_size": 2, "train_steps": 2,
                                        "run_dir": str(root / name), "eval_at_end": False})
        return run_distributed(tf.run_training, world, str(cfg), overrides, timeout=900)[0]

    ref = run("cp1", 1, [])
    got = run("cp2", 2, ["parallel.context_parallel_size=2"])
    keys = tf.LAYOUT_TOLERANCES + (("distill/gkd", 1e-5, 0.0), ("distill/attn_jsd_teacher", 1e-5, 0.0),
                                   ("loss/gkd", 1e-5, 0.0), ("loss/distill_attn", 1e-5, 0.0))
    tf.assert_same_metrics(ref, got, 2, tolerances=keys)
    assert all(r["loss/distill_attn"] > 0 and r["loss/gkd"] > 0 for r in ref)
