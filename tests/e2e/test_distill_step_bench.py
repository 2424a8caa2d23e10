"""tools/bench/distill_step.py runs end to end at the tiny preset and reports what it promises (no timing
asserts): RAL and RAL + distillation measured on the same rollouts, the teacher twice the student's layers and
width, every phase timed (the teacher's only in the distillation run), peak memory of both, the teacher's
share against its FLOPs prediction and the goal flag."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_distill_step_bench_reports_both_variants_on_the_same_rollouts():
    cmd = [sys.executable, "tools/bench/distill_step.py", "--preset", "tiny", "--prompts", "2", "--group-size", "2",
           "--micro-batch-size", "2", "--max-new-tokens", "8", "--max-frames", "2", "--records", "6",
           "--steps", "1", "--warmup", "0", "--gkd-top-k", "4"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    s, t = res["setup"]["student"], res["setup"]["teacher"]
    assert (t["layers"], t["hidden"], t["heads"]) == (2 * s["layers"], 2 * s["hidden"], 2 * s["heads"])
    for variant in ("ral", "ral_distill"):
        row = res[variant]
        assert row["steps"] == 1 and row["peak_mem_gib"] > 0
        for phase in ("gen_s", "old_pass_s", "ref_pass_s", "update_s", "step_s"):
            assert row[phase] > 0, (variant, phase)
    assert res["ral"]["teacher_s"] == 0 < res["ral_distill"]["teacher_s"]
    assert res["ral"]["response_length_mean"] == res["ral_distill"]["response_length_mean"] > 0
    assert res["teacher_over_student_forward_flops"] > 4   # 2x layers, ~4x the work per layer (vocab aside)
    assert res["teacher_over_flops_prediction"] == pytest.approx(
        res["ral_distill"]["teacher_s"] / res["teacher_s_predicted_by_flops"])
    assert res["goal_teacher_le_1.2x_flops_prediction"] == (res["teacher_over_flops_prediction"] <= 1.2)
