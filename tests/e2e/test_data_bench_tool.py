"""tools/bench/decode.py runs both backends on a generated VP9 clip and prints one JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_decode_bench_prints_json(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tools/bench/decode.py", "--clips", str(tmp_path), "--n", "1", "--seconds", "2", "--size", "96x64",
                           "--fps", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["backend"]: r for r in result["results"]}
    assert set(rows) == {"dali", "pyav"}
    for r in rows.values():
        assert r["codec"] == "vp9" and r["fps"] == 1.0 and r["frames"] == 4  # 2 s clip at 1 fps -> min 4 frames
        assert r["frames_per_s"] > 0 and r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0


def test_colour_bench_prints_json(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tools/bench/colour.py", "--out", str(tmp_path), "--frames", "2",
                           "--size", "96x64"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shared_vs_ffmpeg_tagged"]["max"] <= 1 and result["dali_cpu_vs_pyav"]["max"] <= 1
    assert result["dali_rematrix_vs_ffmpeg"]["inside_bt601_cube"]["max"] <= 1
    assert result["shared_vs_ffmpeg_default"]["hd_1280x720_h264"]["matrix_auto"] == "bt709"
    assert 0.1 < result["rgb_cube_outside_bt601"]["frac_outside"] < 0.2
