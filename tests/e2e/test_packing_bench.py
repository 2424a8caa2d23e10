"""tools/bench/packing.py runs end to end on a small batch and reports what it promises (no timing asserts):
each packing measured in its own process over the same batch, the token positions in the expected order, the
LM head apart, the ratios and the goal flag present."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_packing_bench_reports_every_packing():
    cmd = [sys.executable, "tools/bench/packing.py", "--case", "shared_2k", "--prompts", "2", "--group-size", "2",
           "--width", "32", "--layers", "1", "--json"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["vocab"] == 1360  # 32 x 152064 / 3584, a multiple of 8: the 7B's vocabulary per width
    rows = {row["packing"]: row for row in res["rows"]}
    assert set(rows) == {"none", "sequences", "groups"}
    for row in rows.values():
        assert row["cpu_s"] > 0 and row["updates_s"] > 0 and row["lm_head_rows"] > 0 and row["lm_head_s"] > 0
        assert row["sequence_tokens"] == rows["none"]["sequence_tokens"]  # the same batch
    assert rows["groups"]["token_positions"] < rows["sequences"]["token_positions"] <= rows["none"]["token_positions"]
    summary = res["summary"]["shared_2k"]
    assert summary["groups_cpu_vs_none"] == pytest.approx(rows["groups"]["cpu_s"] / rows["none"]["cpu_s"], abs=1e-3)
    assert summary["goal_groups_le_0.35x_none"] == (rows["groups"]["cpu_s"] <= 0.35 * rows["none"]["cpu_s"])
