"""The comparison's bookkeeping against hand-computed numbers: per-run figures from metrics rows, mean and
sample std over seeds, the markdown table round trip, and the spread rule."""

import statistics

import pytest

from megatron_ral.bench import compare_report as R
from megatron_ral.bench.compare_plots import band


def _rows():
    return [
        {"step": 1, "reward/total": 0.2, "response/length_mean": 10.0, "attn/vision_mass": 0.3, "loss/attn": -1e-4,
         "loss/policy": 0.02, "perf/step_s": 2.0},
        {"step": 2, "reward/total": 0.4, "response/length_mean": 12.0, "attn/vision_mass": 0.5, "loss/attn": 3e-4,
         "loss/policy": -0.04, "perf/step_s": 3.0, "train/skipped_updates": 1.0},
        {"step": 2, "eval/accuracy": 0.5, "eval/format": 1.0, "eval/accuracy_by_source/synthetic/task_a": 0.25},
    ]


def test_rl_run_figures_by_hand():
    f = R.rl_run_figures(_rows(), prompts_per_step=8, group_size=4, updates_per_rollout=2, start_accuracy=0.1)
    assert f["generated_tokens"] == (10.0 + 12.0) * 8 * 4
    assert f["rollout_steps"] == 2 and f["optimizer_steps"] == 4 and f["skipped_updates"] == 1.0
    assert f["vision_mass"] == pytest.approx(0.4)
    assert f["loss_attn_abs"] == pytest.approx(2e-4) and f["loss_policy_abs"] == pytest.approx(0.03)
    assert f["loss_ratio"] is None  # lambda_attn 0 (GRPO)
    g = R.rl_run_figures(_rows(), prompts_per_step=8, group_size=4, updates_per_rollout=2, lambda_attn=5.0)
    assert g["loss_ratio"] == pytest.approx(5.0 * 2e-4 / 0.03)
    assert f["heldout_curve"] == [(0, 0.1), (2, 0.5)]
    assert f["per_task"] == {"task_a": 0.25} and f["accuracy"] == 0.5
    assert f["reward_mean_last_quarter"] == pytest.approx(0.4)


def test_aggregate_and_table_round_trip():
    runs = {"grpo": {0: {"accuracy": 0.3, "per_task": {"t": 0.2}}, 1: {"accuracy": 0.5, "per_task": {"t": 0.4}},
                     2: {"accuracy": 0.7, "per_task": {"t": 0.9}}},
            "ral": {0: {"accuracy": 0.61, "per_task": {"t": 0.5}}}}
    s = R.aggregate(runs)
    assert s["grpo"]["accuracy"] == pytest.approx([0.5, statistics.stdev([0.3, 0.5, 0.7])])
    assert s["grpo"]["per_task"]["t"] == pytest.approx([0.5, statistics.stdev([0.2, 0.4, 0.9])])
    assert s["ral"]["accuracy"] == [0.61, 0.0]
    table = R.parse_markdown_table(R.markdown_table(s, ["grpo", "ral"]))
    assert table["grpo"]["held-out acc"] == (0.5, 0.2) and table["ral"]["acc t"] == (0.5, 0.0)
    sep = R.separation(s, "ral", "grpo")
    assert sep["diff"] == pytest.approx(0.11) and sep["spread"] == pytest.approx(0.2) and not sep["exceeds_spread"]


def test_band_mean_and_std_at_common_steps():
    b = band([[(0, 0.1), (5, 0.3)], [(0, 0.3), (5, 0.5), (9, 1.0)]])
    assert [x for x, _, _ in b] == [0, 5]
    assert b[0][1] == pytest.approx(0.2) and b[0][2] == pytest.approx(statistics.stdev([0.1, 0.3]))
