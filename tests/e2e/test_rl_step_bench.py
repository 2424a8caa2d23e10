"""tools/bench/rl_step.py runs end to end at the tiny preset and reports what it promises (no timing asserts):
both algorithms measured on the same rollouts, every phase timed, the ratio and the goal flag present."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_rl_step_bench_reports_both_algorithms_on_the_same_rollouts():
    cmd = [sys.executable, "tools/bench/rl_step.py", "--preset", "tiny", "--prompts", "2", "--group-size", "2",
           "--micro-batch-size", "2", "--max-new-tokens", "8", "--max-frames", "2", "--records", "6",
           "--steps", "1", "--warmup", "0", "--repeats", "2"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["setup"]["repeats"] == 2 and res["setup"]["preset"] == "tiny"
    for algorithm in ("grpo", "ral"):
        row = res[algorithm]
        assert row["steps"] == 2  # one measured step per repeat
        for phase in ("gen_s", "old_pass_s", "ref_pass_s", "update_s", "step_s"):
            assert row[phase] > 0, (algorithm, phase)
        assert row["step_s"] >= row["update_s"]
    # the first step of both starts from the same weights with the same seeds: the same responses
    assert res["grpo"]["response_length_mean"] == res["ral"]["response_length_mean"] > 0
    assert res["ral_over_grpo_step"] == pytest.approx(res["ral"]["step_s"] / res["grpo"]["step_s"])
    assert res["goal_ral_le_1.25x_grpo"] == (res["ral_over_grpo_step"] <= 1.25)
