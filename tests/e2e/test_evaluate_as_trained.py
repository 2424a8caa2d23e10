"""A checkpoint is evaluated as it was trained: tools/evaluate.py on a trained run's held-out split, with no
--config, reads the data / generation settings the checkpoint keeps and reproduces the accuracy the
trainer's final evaluation logged; --out holds the per-record predictions behind that accuracy and the
settings with their sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import TRAINED_SETTINGS

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_evaluate_defaults_to_the_checkpoints_settings(trained_run, tmp_path):
    run_dir, data = trained_run["run_dir"], trained_run["data"]
    logged = [m for m in trained_run["metrics"] if "eval/accuracy" in m][-1]
    out_file = tmp_path / "results.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--ckpt", str(run_dir / "checkpoints"),
           "--data", str(data / "test.json"), "--out", str(out_file), "--json", "--show", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MEGATRON_RAL_PROGRESS="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    results = json.loads(out_file.read_text())

    assert out["accuracy"] == pytest.approx(logged["eval/accuracy"], abs=1e-9)
    assert out["count"] == logged["eval/count"] == results["n"] == len(results["predictions"]) >= 2
    # the settings came from the checkpoint's kept configuration, not the defaults
    settings = results["settings"]
    assert settings["config"].endswith("run_config.yaml")
    for dotted, value in TRAINED_SETTINGS.items():
        section, key = dotted.split(".")
        assert settings[section][key] == value, dotted
        assert settings["source"][dotted].startswith("checkpoint "), dotted
    # the accuracy is the mean of the per-record predictions, per type too
    preds = results["predictions"]
    assert results["accuracy"] == pytest.approx(sum(p["accuracy"] for p in preds) / len(preds))
    for ptype, acc in results["by_problem_type"].items():
        rows = [p["accuracy"] for p in preds if p["problem_type"] == ptype]
        assert acc == pytest.approx(sum(rows) / len(rows))
    assert results["skipped"] == {"count": 0, "by_reason": {}, "records": []}
    records = {str(r["problem_id"]) for r in json.loads((data / "test.json").read_text())}
    assert {str(p["problem_id"]) for p in preds} == records

    # the settings matter: the built-in defaults (an empty --config) give the same records other inputs,
    # hence other greedy responses
    (tmp_path / "empty.yaml").write_text("# defaults\n")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--ckpt", str(run_dir / "checkpoints"),
           "--data", str(data / "test.json"), "--config", str(tmp_path / "empty.yaml"), "--template", "answer_only",
           "--max-new-tokens", "6", "--max-records", "2", "--json", "data.num_workers=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    other = json.loads(proc.stdout.strip().splitlines()[-1])
    assert other["settings"]["source"]["data.max_frames"] == f"--config {tmp_path / 'empty.yaml'}"
    assert other["settings"]["data"]["image_max_pixels"] != TRAINED_SETTINGS["data.image_max_pixels"]
    assert [s["response"] for s in other["samples"]] != [s["response"] for s in out["samples"]]


def test_flags_override_the_kept_settings(trained_run, tmp_path):
    run_dir, data = trained_run["run_dir"], trained_run["data"]
    cmd = [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--ckpt", str(run_dir / "checkpoints"),
           "--data", str(data / "test.json"), "--max-new-tokens", "2", "--max-records", "1", "--json",
           "data.fps=1.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MEGATRON_RAL_PROGRESS="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    settings = json.loads(proc.stdout.strip().splitlines()[-1])["settings"]
    assert settings["generation"]["max_new_tokens"] == 2 and settings["source"]["generation.max_new_tokens"] == "flag"
    assert settings["data"]["fps"] == 1.0 and settings["source"]["data.fps"] == "override"
    assert settings["data"]["template"] == "answer_only" and settings["source"]["data.template"].startswith("checkpoint")


def test_generate_and_dump_attention_use_the_kept_settings(trained_run, tmp_path):
    """generate.py / dump_attention.py on the run's checkpoint: the video is sampled with the run's budgets
    (fewer, smaller frames than the checkpoint's preprocessor defaults) and generation stops at the run's
    response cap; both state where the settings came from."""
    from megatron_ral.data.processor import QwenVLProcessor
    from megatron_ral.data.single import preprocess_single

    run_dir, data = trained_run["run_dir"], trained_run["data"]
    ckpt = run_dir / "checkpoints"
    video = next(data / r["path"] for r in json.loads((data / "train.json").read_text()) if r["data_type"] == "video")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MEGATRON_RAL_PROGRESS="0")

    def tool(name, *args):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), "--ckpt", str(ckpt), "--prompt",
                               "What happens?", "--video", str(video), "--json", *args], capture_output=True,
                              text=True, env=env, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    gen = tool("generate.py", "--greedy")
    assert gen["settings"]["source"]["generation.max_new_tokens"].startswith("checkpoint ")
    assert len(gen["token_ids"]) <= TRAINED_SETTINGS["generation.max_new_tokens"]
    dumped = tool("dump_attention.py", "--response", "<answer>A</answer>", "--out", str(tmp_path / "rows.pt"))
    assert dumped["settings"]["source"]["data.max_frames"].startswith("checkpoint ")

    # the prompt length is the one the run's budgets give, not the checkpoint's preprocessor defaults
    model_dir = sorted(ckpt.glob("iter_*"))[-1]
    processor = QwenVLProcessor.from_pretrained(str(model_dir))
    budget = dict(fps=TRAINED_SETTINGS["data.fps"], max_frames=TRAINED_SETTINGS["data.max_frames"],
                  min_pixels=TRAINED_SETTINGS["data.video_min_pixels"],
                  max_pixels=TRAINED_SETTINGS["data.video_max_pixels"])
    trained = preprocess_single(str(model_dir), video=str(video), prompt="What happens?", processor=processor, **budget)
    default = preprocess_single(str(model_dir), video=str(video), prompt="What happens?", processor=processor)
    assert trained["input_ids"].shape[-1] != default["input_ids"].shape[-1]
    assert gen["prompt_length"] == dumped["prompt_length"] == trained["input_ids"].shape[-1]
