"""The algorithm comparison end to end in reduced form (1 seed, the arms sft, grpo, ral and distill with a
tiny teacher, 2 RL steps): every output is written, the table parses back to the numbers of results.json,
the RL arms had equal compute (same rollout and optimizer steps, as the runs' own metrics.jsonl count
them), the gradient-norm diagnostic of every run is in the table, the teacher is reported apart, and a
second invocation reruns nothing."""

import contextlib
import io
import json

import pytest

from megatron_ral.bench import compare
from megatron_ral.bench.compare_report import parse_markdown_table, read_metrics

pytestmark = pytest.mark.e2e
STEPS = 2
ARGS = ["--seeds", "1", "--algorithms", "sft,grpo,ral,distill", "--steps", str(STEPS), "--records", "24",
        "--sft-epochs", "1", "--eval-points", "1", "--prompts-per-step", "4", "--group-size", "2",
        "--think-tokens", "24", "--jobs", "2", "--teacher-preset", "tiny", "--teacher-sft-epochs", "1"]


def test_reduced_comparison(tmp_path):
    out = tmp_path / "cmp"
    assert compare.main(["--out", str(out)] + ARGS) == 0
    for name in ("results.json", "results.md", "curves.png", "attention.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    table = parse_markdown_table((out / "results.md").read_text())
    assert set(table) == {"sft", "grpo", "ral", "distill"}
    for arm, row in table.items():
        mean, std = row["held-out acc"]
        assert mean == pytest.approx(res["summary"][arm]["accuracy"][0], abs=5e-4) and std == 0.0
        assert row["seeds"] == "1"
    # equal compute, counted from the runs' own metrics: one row per rollout step, 2 updates per rollout batch
    for arm in ("grpo", "ral", "distill"):
        rows = [r for r in read_metrics(out / "runs" / arm / "seed0") if "reward/total" in r]
        # the gradient-norm diagnostic ran on every step here (2 steps / 4 points -> every step)
        assert all("diag/grad_norm/policy" in r for r in rows)
        if arm != "grpo":  # None where the policy gradient is 0 (a tiny SFT: every group can be zero-variance)
            vals = [r["diag/grad_ratio/attn"] for r in rows if r["diag/grad_ratio/attn"] is not None]
            cell = table[arm]["grad attn/policy"]
            assert cell[0] == pytest.approx(sum(vals) / len(vals), rel=5e-3, abs=1e-12) if vals else cell == "–"
        else:
            assert table[arm]["grad attn/policy"] == "–" and "diag/grad_ratio/attn" not in rows[0]
        assert len(rows) == STEPS
        fig = res["runs"][arm]["0"]
        assert fig["rollout_steps"] == STEPS and fig["optimizer_steps"] == 2 * STEPS
        assert fig["generated_tokens"] == pytest.approx(sum(r["response/length_mean"] * 4 * 2 for r in rows))
        assert fig["heldout_curve"][0][1] == res["runs"]["sft"]["0"]["accuracy"]  # starts from its SFT checkpoint
    assert res["equal_compute"]["equal"] is True
    assert all("diag/grad_ratio/distill_attn" in r and "diag/grad_ratio/gkd" in r
               for r in read_metrics(out / "runs" / "distill" / "seed0") if "reward/total" in r)
    teacher = res["teacher"]
    assert teacher["forward_seconds_in_arms"]["distill"] > 0 and 0.0 <= teacher["accuracy"] <= 1.0
    assert "Teacher (tiny preset" in (out / "results.md").read_text()
    assert res["prepare"]["think_max_new_tokens"] == 24
    # resumable: the finished runs are not rerun
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert compare.main(["--out", str(out)] + ARGS) == 0
    assert "running" not in buf.getvalue()
