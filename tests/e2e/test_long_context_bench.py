"""tools/bench/long_context.py on short sequences: every case runs in its own gloo world, the RAL update's
loss is the same at CP=1 and CP=2 (the split changes where the work happens, not the result), each CP rank
reports its own peak, and the summary compares them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_long_context_bench_small(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "tools/bench/long_context.py", "--lengths", "512", "1024", "--rows", "64",
                           "--json", "--quiet", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    cases = {(c["T"], c["CP"]): c for c in result["cases"]}
    assert set(cases) == {(512, 1), (512, 2), (1024, 1), (1024, 2)}
    for t in (512, 1024):
        one, two = cases[(t, 1)], cases[(t, 2)]
        assert one["status"] == two["status"] == "ok"
        assert abs(one["loss"] - two["loss"]) <= 1e-5 * abs(one["loss"])
        assert len(two["peak_extra_mib_by_rank"]) == 2 and two["peak_extra_mib_per_rank"] > 0
    assert {r["T"] for r in result["summary"]["ratios"]} == {512, 1024}


def test_long_context_bench_rejects_lengths_that_do_not_split():
    proc = subprocess.run([sys.executable, "tools/bench/long_context.py", "--lengths", "1030", "--cp", "1", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--lengths must be multiples of 2 x every --cp value" in proc.stderr
