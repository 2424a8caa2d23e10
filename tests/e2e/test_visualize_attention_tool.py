"""tools/visualize_attention.py on a trained run: readable PNGs of the expected pixel sizes, and the numbers
the bars are drawn from are the response rows' attention split over the video frames: per-frame masses
recomputed here from the saved rows and token ids, summing to the rows' vision mass."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_visualize_video_record_and_curves(trained_run, tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_ral.checkpoint.run_config import find_run_config  # noqa: F401 (the run keeps its config)
    from megatron_ral.logging.plots import CURVES

    run_dir, data = trained_run["run_dir"], trained_run["data"]
    records = json.loads((data / "train.json").read_text())
    record = next(r for r in records if r["data_type"] == "video")
    out = tmp_path / "pics"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "visualize_attention.py"), "--ckpt",
           str(run_dir / "checkpoints"), "--sample", json.dumps(record), "--response", "<answer>B</answer>",
           "--out", str(out), "--run", str(run_dir), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MEGATRON_RAL_PROGRESS="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    numbers = json.loads((out / "attention.json").read_text())
    dumped = torch.load(out / "attention.pt")

    # the chosen tokens are the answer's
    assert "".join(numbers["chosen_text"]).strip() == "B"
    # the bars: mean over the chosen rows of the mass on each temporal step's placeholders, recomputed here
    from megatron_ral.data.processor import QwenVLProcessor

    video_id = QwenVLProcessor.from_pretrained(str(run_dir / "checkpoints" / "iter_0000002")).video_token_id
    ids, plen = dumped["input_ids"], dumped["prompt_length"]
    rows = dumped["rows"][numbers["chosen_tokens"]].double()
    cols = (ids == video_id).nonzero().flatten()
    bars = numbers["video_frame_mass"]
    steps = len(bars)
    assert steps >= 2 and cols.numel() % steps == 0
    per = cols.numel() // steps
    mine = [float(rows[:, cols[f * per:(f + 1) * per]].sum(-1).mean()) for f in range(steps)]
    assert bars == pytest.approx(mine, abs=1e-9)
    vision = float(rows[:, cols].sum(-1).mean())
    assert sum(bars) == pytest.approx(vision, abs=1e-9)
    assert sum(numbers["vision_mass"]) / len(numbers["chosen_tokens"]) == pytest.approx(vision, abs=1e-9)
    assert 0.0 < vision < 1.0
    # each row is a distribution over the tokens before it
    r0 = numbers["chosen_tokens"][0]
    assert float(dumped["rows"][r0, : plen + r0].sum()) == pytest.approx(1.0, abs=1e-5)
    # the steps start at equal intervals (second_per_grid_ts of the sampled video)
    starts = numbers["video_frame_start_seconds"]
    assert starts[0] == 0.0 and starts[1] > 0 and starts == pytest.approx([f * starts[1] for f in range(steps)])

    # the pictures, at their fixed sizes
    assert _png_size(summary["frames"]) == (800, 350)
    cols_ = min(4, steps)
    assert _png_size(summary["patches"]) == (300 * cols_, 260 * math.ceil(steps / cols_))
    panels = sum(1 for k in CURVES if any(k in m for m in trained_run["metrics"]))
    assert panels >= 1
    assert _png_size(summary["curves"]) == (500 * min(2, panels), 320 * math.ceil(panels / 2))
    for key in ("frames", "patches", "curves"):
        assert os.path.getsize(summary[key]) > 5_000, key


def test_visualize_refuses_bad_sample(trained_run, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "visualize_attention.py"), "--ckpt",
           str(trained_run["run_dir"] / "checkpoints"), "--sample", "{not json", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "--sample" in proc.stderr, proc.stderr
