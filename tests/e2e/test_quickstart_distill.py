"""``bash examples/quickstart.sh --distill`` end to end in reduced form (fewer records, epochs and steps), into
a temporary directory: the summary has the RL quickstart's keys plus the teacher's accuracy and the
divergences to the teacher; the distillation run logs distill/attn_jsd_teacher and distill/gkd every step,
and the student's attention moves toward the teacher's (the JSD to it is lower in the last quarter of the
steps than in the first); the HF export loads."""

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
REDUCED = {"RECORDS": "120", "SFT_EPOCHS": "1", "TEACHER_SFT_EPOCHS": "1", "DISTILL_STEPS": "8"}
RL_KEYS = ("accuracy_base", "accuracy_sft", "accuracy_rl", "chance_accuracy", "hf_export_dir", "checkpoint_dir",
           "heldout_data", "run_dir", "wall_seconds")


def test_quickstart_distill_in_reduced_form(tmp_path):
    out = tmp_path / "qsd"
    env = {**os.environ, **REDUCED}
    env.pop("OUT", None)
    r = subprocess.run(["bash", "examples/quickstart.sh", "--distill", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "quickstart done" in r.stdout and "teacher: held-out accuracy" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    for key in RL_KEYS + ("accuracy_teacher", "attn_jsd_teacher_first_quarter", "attn_jsd_teacher_last_quarter",
                          "gkd_first_quarter", "gkd_last_quarter"):
        assert key in s, key
    assert 0.0 <= s["accuracy_teacher"] <= 1.0 and s["rl_steps"] == 8
    assert Path(s["run_dir"]) == out / "distill" and Path(s["checkpoint_dir"]).name == "iter_0000008"
    rows = [json.loads(line) for line in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/total" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for row in steps:
        assert row["distill/attn_jsd_teacher"] > 0 and row["distill/gkd"] > 0 and row["perf/teacher_s"] > 0
    assert s["attn_jsd_teacher_last_quarter"] < s["attn_jsd_teacher_first_quarter"], s
    assert any((Path(s["hf_export_dir"])).glob("*.safetensors"))
