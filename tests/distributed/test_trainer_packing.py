"""Three RAL steps with each ``training.packing`` value give the metrics of ``none`` (the padded path): the same
rollouts, and losses, attention metrics and gradient norms within 1e-5 relative; the packed runs really
packed (fewer token positions per pass; groups over the budget split into sub-streams)."""

from __future__ import annotations

import math

import pytest

import trainer_fixture as tf
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    return {"root": root, "tiny": tf.make_assets(root, "tiny")}


def _run(assets, name: str, overrides: list[str]) -> list[dict]:
    root = assets["root"]
    cfg = tf.write_config(root / f"{name}.yaml", assets["tiny"], root / name, checkpoint={"save_final": False})
    return run_distributed(tf.run_training, 1, str(cfg), overrides, timeout=900)[0]


def _assert_same(ref: list[dict], got: list[dict], label: str) -> None:
    tf.assert_same_metrics(ref, got, 3, label)
    assert any(abs(r["loss/attn"]) > 1e-7 for r in ref), "the attention term never acted: the test would be vacuous"


def test_each_packing_gives_the_metrics_of_none(assets):
    ref = _run(assets, "none", ["training.packing=none", "training.micro_batch_size=3"])
    positions = {}
    # prompts of ~150 tokens with 4 responses of <= 12 tokens: a budget of 400 holds two groups, 200 splits a
    # group of long responses into sub-streams
    for name, overrides in (
        ("sequences", ["training.packing=sequences", "training.max_tokens_per_micro_batch=300"]),
        ("groups", ["training.packing=groups", "training.max_tokens_per_micro_batch=400"]),
        ("groups_split", ["training.packing=groups", "training.max_tokens_per_micro_batch=200"]),
    ):
        got = _run(assets, name, overrides)
        _assert_same(ref, got, name)
        positions[name] = [r["perf/token_positions"] for r in got]
    print({"none": [r["perf/token_positions"] for r in ref], **positions})
    # packed passes compute fewer positions; a group split over the budget repeats its prompt per sub-stream
    for step in range(3):
        assert positions["groups"][step] <= positions["groups_split"][step] <= positions["sequences"][step] \
            < ref[step]["perf/token_positions"]
    assert sum(positions["groups"]) < sum(positions["groups_split"]) < sum(positions["sequences"])


def test_sft_packed_sequences_give_the_metrics_of_none(assets):
    """SFT (target cross-entropy over the global batch's target tokens) in packed sequences = padded."""
    sft = ["algorithm.name=sft", "training.train_steps=2", "training.prompts_per_step=4"]
    ref = _run(assets, "sft_none", sft + ["training.packing=none", "training.micro_batch_size=1"])
    got = _run(assets, "sft_sequences", sft + ["training.packing=sequences", "training.max_tokens_per_micro_batch=400"])
    assert len(ref) == len(got) == 2
    for a, b in zip(ref, got):
        assert a["loss/sft"] > 0
        for k in ("loss/sft", "train/grad_norm"):
            assert math.isclose(a[k], b[k], rel_tol=1e-5), f"SFT step {a['step']} {k}: {a[k]} vs {b[k]}"


def test_distillation_packed_gives_the_metrics_of_none(assets):
    """RAL + distillation (the teacher pass over the same packed micro-batches: its rows and GKD targets) with
    shared-prompt groups and packed sequences gives the padded run's metrics."""
    teacher = tf.make_assets(assets["root"], "small", seed=3)
    distill = ["algorithm.name=ral_distill", "algorithm.gkd_mu=0.2", "algorithm.gamma_attn=5.0",
               f"algorithm.teacher_load={teacher['mcore']}"]
    ref = _run(assets, "distill_none", distill + ["training.packing=none", "training.micro_batch_size=3"])
    for name, packing, budget in (("distill_groups", "groups", 200), ("distill_sequences", "sequences", 300)):
        got = _run(assets, name, distill + [f"training.packing={packing}",
                                            f"training.max_tokens_per_micro_batch={budget}"])
        _assert_same(ref, got, name)
        for a, b in zip(ref, got):
            assert a["distill/gkd"] > 0.1 and a["distill/attn_jsd_teacher"] > 1e-3
            for k in ("distill/gkd", "distill/attn_jsd_teacher", "loss/gkd", "loss/distill_attn"):
                assert math.isclose(a[k], b[k], rel_tol=1e-5), f"{name} step {a['step']} {k}: {a[k]} vs {b[k]}"
