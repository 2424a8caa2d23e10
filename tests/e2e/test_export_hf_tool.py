"""tools/export_hf.py on a trained run: the newest checkpoint becomes an HF directory that transformers
loads and generates from; --verify reports the export's fp32 logits equal to the Megatron model's (image and
video prompts) within 1e-4; the processor configs carry the run's vision budgets, so AutoProcessor on the
export builds the image inputs the training pipeline builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TRAINED_SETTINGS

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MEGATRON_RAL_PROGRESS="0")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_hf.py"), *args], capture_output=True,
                          text=True, env=env, timeout=600, cwd=cwd)


def test_export_round_trip_with_verify(trained_run, tmp_path):
    run_dir, out = trained_run["run_dir"], tmp_path / "hf"
    proc = _run(["--run", str(run_dir), "--out", str(out), "--verify", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert summary["checkpoint"].endswith(steps[-1])
    assert summary["generated_ids"], summary
    for kind in ("image", "video"):
        fig = summary["verify"][kind]
        assert fig["max_abs"] <= 1e-4 and fig["positions"] > 8 and fig["max_logit"] > 0.1, (kind, fig)
    assert summary["verify"]["passed"]

    # the vision budgets of the run are in the processor configs
    image = json.loads((out / "preprocessor_config.json").read_text())
    video = json.loads((out / "video_preprocessor_config.json").read_text())
    assert image["size"] == {"shortest_edge": TRAINED_SETTINGS["data.image_min_pixels"],
                             "longest_edge": TRAINED_SETTINGS["data.image_max_pixels"]}
    assert video["size"] == {"shortest_edge": TRAINED_SETTINGS["data.video_min_pixels"],
                             "longest_edge": TRAINED_SETTINGS["data.video_max_pixels"]}
    assert (video["fps"], video["max_frames"], video["do_sample_frames"]) == (TRAINED_SETTINGS["data.fps"],
                                                                             TRAINED_SETTINGS["data.max_frames"], True)

    # AutoProcessor on the export gives the inputs the training pipeline built for an image record
    from PIL import Image
    from transformers import AutoProcessor

    from megatron_ral.config.data import DataConfig
    from megatron_ral.data.processor import QwenVLProcessor
    from megatron_ral.data.samples import SampleBuilder

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, size=(90, 130, 3), dtype=np.uint8)).save(tmp_path / "pic.png")
    record = {"problem_id": 1, "problem": "Colour?", "data_type": "image", "problem_type": "free-form",
              "solution": "<answer>red</answer>", "path": "pic.png"}
    from megatron_ral.data.records import parse_record

    data = {k.split(".")[1]: v for k, v in TRAINED_SETTINGS.items() if k.startswith("data.")}
    sample = SampleBuilder(QwenVLProcessor.from_pretrained(str(out)), DataConfig(media_root=str(tmp_path), **data),
                           "prompt").build(parse_record(record, "test"))
    ours = sample.vision[0]
    hf = AutoProcessor.from_pretrained(str(out)).image_processor(images=[Image.open(tmp_path / "pic.png")],
                                                                 return_tensors="pt")
    assert hf["image_grid_thw"].tolist() == [list(ours.grid_thw)]
    torch.testing.assert_close(hf["pixel_values"].float(), ours.pixel_values.float(), atol=1e-5, rtol=0)


def test_export_names_missing_step(trained_run, tmp_path):
    proc = _run(["--run", str(trained_run["run_dir"]), "--step", "99", "--out", str(tmp_path / "hf")], tmp_path)
    assert proc.returncode == 2
    assert "--step 99" in proc.stderr and "steps: 2" in proc.stderr
    assert not (tmp_path / "hf").exists()
