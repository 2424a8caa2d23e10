"""The comparison's bookkeeping against hand-computed numbers: per-run figures from metrics rows, mean and
sample std over seeds, the markdown table round trip, and the spread rule."""

import statistics

import pytest

from megatron_ral.bench import compare_report as R


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
    b = R.band([[(0, 0.1), (5, 0.3)], [(0, 0.3), (5, 0.5), (9, 1.0)]])
    assert [x for x, _, _ in b] == [0, 5]
    assert b[0][1] == pytest.approx(0.2) and b[0][2] == pytest.approx(statistics.stdev([0.1, 0.3]))


def test_lambda_sweep_stopping_rule():
    from megatron_ral.bench.compare import SWEEP_MAX_EXTRA, next_sweep_value, parse_args

    assert next_sweep_value([0.5, 1.0, 5.0], 0, 0.01) == 10.0          # powers of 10 above the largest value
    assert next_sweep_value([0.5, 1.0, 5.0, 10.0], 1, 0.1) == 100.0
    assert next_sweep_value([0.5, 1.0, 5.0, 10.0], 1, 0.5) is None      # the attention gradient is half the policy's
    assert next_sweep_value([1.0, 10.0, 100.0, 1e3, 1e4], SWEEP_MAX_EXTRA, 0.01) is None   # at most four more
    assert next_sweep_value([5.0], 0, None) is None                     # nothing measured: stop
    s = parse_args(["--out", "x", "--lambda-attn", "0.5,1,5,..."])
    assert s.lambda_sweep == [0.5, 1.0, 5.0] and s.sweep_continue
    assert parse_args(["--out", "x", "--lambda-attn", "2"]).sweep_continue is False
    for bad in ("...", "0,1", "a,b"):
        with pytest.raises(SystemExit):
            parse_args(["--out", "x", "--lambda-attn", bad])


def test_table_shows_the_gradient_ratio_only_when_measured():
    runs = {"grpo": {0: {"accuracy": 0.3}}, "ral": {0: {"accuracy": 0.4, "grad_ratio_attn": 2e-3}}}
    table = R.parse_markdown_table(R.markdown_table(R.aggregate(runs), ["grpo", "ral"]))
    assert table["ral"]["grad attn/policy"] == (2e-3, 0.0) and table["grpo"]["grad attn/policy"] == "–"
    assert "grad gkd/policy" not in table["ral"]
    rows = [{"step": 1, "reward/total": 0.1, "diag/grad_norm/policy": 2.0, "diag/grad_ratio/attn": 0.1},
            {"step": 2, "reward/total": 0.2}, {"step": 3, "reward/total": 0.3, "diag/grad_norm/policy": 4.0,
                                               "diag/grad_ratio/attn": 0.3, "perf/teacher_s": 1.5},
            {"step": 3, "eval/accuracy": 0.5}]
    f = R.rl_run_figures(rows, prompts_per_step=2, group_size=2, updates_per_rollout=1)
    assert f["grad_ratio_attn"] == pytest.approx(0.2) and f["grad_norm_policy"] == pytest.approx(3.0)
    assert f["diagnostic_steps"] == 2 and f["grad_ratio_gkd"] is None and f["teacher_seconds"] == 1.5


def test_a_directory_refuses_runs_of_other_settings(tmp_path):
    from megatron_ral.bench.compare import check_same_settings, parse_args
    from megatron_ral.errors import UsageError

    out = str(tmp_path / "cmp")
    (tmp_path / "cmp").mkdir()
    first = parse_args(["--out", out, "--steps", "4"])
    first.think_tokens = 50                         # as measured by the first invocation
    check_same_settings(first)
    again = parse_args(["--out", out, "--steps", "4", "--seeds", "5", "--lambda-attn", "5,...", "--jobs", "1"])
    check_same_settings(again)                      # more seeds, extra rows, jobs: the runs stay valid
    assert again.think_tokens == 50
    with pytest.raises(UsageError, match="--steps: .* holds runs made with 4, not 6"):
        check_same_settings(parse_args(["--out", out, "--steps", "6"]))
