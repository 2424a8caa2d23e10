"""Shared e2e fixtures: one tiny checkpoint (HF + Megatron) per session and the inputs of the bad-input
table (broken media, broken checkpoints, broken config files), all generated here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """(hf_dir, megatron_dir) of the seeded tiny preset, converted once per session."""
    from megatron_ral.testing.inference import converted_checkpoint

    return converted_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), "tiny", seed=21)


def _corrupt_copy(src: Path, dst: Path, name: str, data: bytes | None = None, keep: int | None = None) -> Path:
    """A copy of checkpoint dir ``src`` whose file ``name`` holds ``data`` or its first ``keep`` bytes."""
    shutil.copytree(src, dst)
    target = dst / name
    target.write_bytes(data if data is not None else target.read_bytes()[:keep])
    return dst


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory, tiny_checkpoint) -> dict[str, str]:
    """Placeholder name -> path of every input the bad-input table uses (read-only for the cases)."""
    from PIL import Image

    from megatron_ral.data.synthetic import write_video

    hf, mc = tiny_checkpoint
    root = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 255, size=(8, 64, 96, 3), dtype=np.uint8)
    write_video(str(root / "ok.webm"), frames, fps=8, codec="vp9")
    Image.fromarray(frames[0]).save(root / "ok.png")
    (root / "zero.mp4").write_bytes(b"")
    (root / "trunc.webm").write_bytes((root / "ok.webm").read_bytes()[:300])
    png = (root / "ok.png").read_bytes()
    (root / "trunc.png").write_bytes(png[: len(png) // 2])
    (root / "random.mp4").write_bytes(rng.bytes(4096))
    (root / "random.png").write_bytes(rng.bytes(4096))
    (root / "random.bin").write_bytes(rng.bytes(4096))
    (root / "a_file").write_text("a regular file where a directory is needed\n")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("keep\n")

    weights = "model.safetensors"
    _corrupt_copy(hf, root / "hf_trunc", weights, keep=300)
    _corrupt_copy(hf, root / "hf_random", weights, data=rng.bytes(4096))
    cfg = json.loads((hf / "config.json").read_text())
    cfg["text_config"]["num_attention_heads"] = "four"
    _corrupt_copy(hf, root / "hf_badtype", "config.json", data=json.dumps(cfg).encode())
    distcp = next(p.name for p in mc.iterdir() if p.suffix == ".distcp")
    _corrupt_copy(mc, root / "mc_trunc", distcp, keep=64)
    _corrupt_copy(mc, root / "mc_random", "metadata.json", data=rng.bytes(2048))

    (root / "empty.json").write_bytes(b"")
    (root / "unknown_key.json").write_text(json.dumps({"text_config": {"num_attention_head": 8}}))
    (root / "wrong_type.json").write_text(json.dumps({"text_config": {"num_attention_heads": "four"}}))
    (root / "bad_value.json").write_text(json.dumps({"rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 2]}}))
    (root / "empty.yaml").write_bytes(b"")
    (root / "unknown_key.yaml").write_text("algorithm:\n  lambda_atn: 1.0\n")
    (root / "wrong_type.yaml").write_text("parallel:\n  tensor_model_parallel_size: two\n")
    (root / "records.json").write_text(json.dumps([{
        "problem_id": 0, "problem": "What colour is the square?", "data_type": "image", "problem_type": "multiple choice",
        "options": ["A. red", "B. blue"], "solution": "<answer>A</answer>", "path": "ok.png"}]))

    paths = {p.name.replace(".", "_"): str(p) for p in root.iterdir()}
    paths.update(hf=str(hf), mc=str(mc), root=str(root))
    return paths



# A short single-process SFT run whose data and generation settings all differ from the tools' defaults
# (frames, pixel budgets, template, response cap): the tools must read them from the checkpoint.
TRAINED_SETTINGS = {"data.template": "answer_only", "data.fps": 2.0, "data.max_frames": 4,
                    "data.video_min_pixels": 3136, "data.video_max_pixels": 3136, "data.image_min_pixels": 3136,
                    "data.image_max_pixels": 6272, "generation.max_new_tokens": 6}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_checkpoint) -> dict:
    """{"run_dir", "data", "hf", "metrics"} of a 2-step SFT run of the tiny checkpoint with a final
    held-out evaluation (the trainer's ``eval/accuracy``), its checkpoint in RUN_DIR/checkpoints."""
    import os
    import subprocess
    import sys

    import yaml

    from megatron_ral.data.synthetic import make_synthetic_dataset

    hf, mc = tiny_checkpoint
    root = tmp_path_factory.mktemp("trained_run")
    data, run_dir = root / "data", root / "run"
    make_synthetic_dataset(str(data), 20, seed=7)
    cfg = {"model": {"load": str(mc), "dtype": "fp32"},
           "data": {"train_files": [str(data / "train.json")], "eval_files": [str(data / "test.json")],
                    "media_root": str(data), "num_workers": 0},
           "algorithm": {"name": "sft"},
           "optimizer": {"lr": 1e-3},
           "training": {"prompts_per_step": 4, "micro_batch_size": 2, "train_steps": 2, "run_dir": str(run_dir),
                        "eval_at_end": True},
           "checkpoint": {"save_interval": 0},
           "logging": {"wandb_mode": "disabled", "progress": False}}
    for dotted, value in TRAINED_SETTINGS.items():
        section, key = dotted.split(".")
        cfg.setdefault(section, {})[key] = value
    (root / "sft.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", MEGATRON_RAL_PROGRESS="0", HF_HUB_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "megatron_ral.train", "--config", str(root / "sft.yaml")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"run_dir": run_dir, "data": data, "hf": hf, "metrics": metrics}
