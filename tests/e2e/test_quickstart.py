"""The README's main command, end to end in reduced form (fewer records and RL steps), into a temporary
directory: the summary's learning claim holds in small (SFT takes the held-out accuracy from the base
model's 0 above chance; the RL reward rises from the first to the last quarter of its steps), every
output it names exists, and the HF export equals the final Megatron checkpoint's weights."""

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
REDUCED = {"RECORDS": "240", "SFT_EPOCHS": "2", "RL_STEPS": "24"}


def test_quickstart_learns_in_reduced_form(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "OUT": str(out), **REDUCED}
    r = subprocess.run(["bash", "examples/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "quickstart done" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    for key in ("accuracy_base", "accuracy_sft", "accuracy_rl", "chance_accuracy", "hf_export_dir", "checkpoint_dir",
                "heldout_data", "run_dir", "wall_seconds"):
        assert key in s, key
    assert 0.0 <= s["accuracy_base"] < s["chance_accuracy"] < 1.0
    assert s["accuracy_sft"] >= s["chance_accuracy"] + 0.05, s
    assert s["rl_steps"] == 24 and s["reward_last_quarter"] > s["reward_first_quarter"], s
    assert 0.0 <= s["accuracy_rl"] <= 1.0
    assert (Path(s["run_dir"]) / "metrics.jsonl").is_file() and Path(s["heldout_data"]).is_file()
    assert Path(s["checkpoint_dir"]).name == "iter_0000024"
    assert Path(s["curves"]) == (out / "curves.png").resolve() and Path(s["curves"]).stat().st_size > 10_000

    # the export is the final checkpoint: same weights tensor by tensor (through the converter's own mapping)
    from safetensors.torch import load_file

    from megatron_ral.checkpoint.convert import megatron_to_hf

    again = tmp_path / "again"
    megatron_to_hf(s["checkpoint_dir"], again, progress=False)
    exported = {}
    for f in sorted(Path(s["hf_export_dir"]).glob("*.safetensors")):
        exported.update(load_file(str(f)))
    reference = load_file(str(next(again.glob("*.safetensors"))))
    assert exported.keys() == reference.keys() and all((exported[k] == reference[k]).all() for k in exported)
    initial = load_file(str(next((out / "hf").glob("*.safetensors"))))
    assert any(not (initial[k] == exported[k]).all() for k in exported if k.startswith("model.layers"))
