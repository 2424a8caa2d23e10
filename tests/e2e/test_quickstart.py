"""The README's main command, end to end, into a temporary directory."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "OUT": str(out)}
    r = subprocess.run(["bash", "examples/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "round trip bit-exact" in r.stdout
    assert "quickstart done" in r.stdout
    sample = torch.load(out / "sample.pt", weights_only=False)
    assert sample["position_ids"].shape[0] == 3 and sample["pixel_values_videos"].shape[1] == 1176
    d = torch.load(out / "attention.pt")
    rows, p = d["rows"], d["prompt_length"]
    assert rows.shape[1] == d["input_ids"].shape[0] == p + rows.shape[0]
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[0]), atol=1e-5, rtol=0)
    # Row r sees positions 0..P+r-1 only.
    for r_ in range(rows.shape[0]):
        assert rows[r_, p + r_:].abs().max() == 0
