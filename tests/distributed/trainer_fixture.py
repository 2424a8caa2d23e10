"""A tiny training setup for trainer tests: checkpoint, synthetic records, a config, the run in N ranks.

``text_reward`` is a deterministic reward of the response text that varies between random responses
(the Video-R1 reward is 0 for every response of an untrained model, which would leave every advantage
0 and the loss terms trivially 0); it is passed through the ``algorithm.reward_function`` key.
``assert_same_metrics`` compares two runs' metrics step by step (the layout-equality tests).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import yaml

SAME_ROLLOUT = ("reward/total", "reward/accuracy", "response/length_mean")
# (metric, relative tolerance, absolute tolerance). Quantities computed directly agree to 1e-5 relative.
# The policy and attention losses are sums of +-A_i terms (group-normalised advantages sum to zero per
# group) that cancel to ~1e-3 of the terms' size; they are compared to 1e-5 of the terms' scale (|A| ~ 1
# for the policy term, |A| x JSD ~ 1e-4 for the attention term), which float32 rounding meets with ~10x margin
# (measured differences: policy <= 2e-7, attention <= 2e-9, jsd_old <= 8e-9).
LAYOUT_TOLERANCES = (
    ("loss/policy", 1e-5, 1e-5), ("loss/total", 1e-5, 1e-5), ("loss/kl", 1e-5, 1e-9),
    ("loss/attn", 1e-5, 1e-9), ("attn/jsd_old", 1e-5, 1e-7), ("attn/entropy", 1e-5, 0.0),
    ("attn/vision_mass", 1e-5, 0.0), ("train/grad_norm", 1e-5, 0.0),
)


def assert_same_metrics(ref: list[dict], got: list[dict], steps: int, label: str = "",
                        tolerances=LAYOUT_TOLERANCES, same_rollout=SAME_ROLLOUT) -> None:
    """``steps`` rows each; per step the rollout metrics equal (up to the order of a float64 sum over ranks)
    and every (metric, rel, abs) of ``tolerances`` within its tolerance."""
    assert len(ref) == len(got) == steps, (len(ref), len(got))
    where = f"{label} " if label else ""
    for a, b in zip(ref, got):
        for k in same_rollout:
            assert math.isclose(a[k], b[k], rel_tol=1e-12), f"{where}step {a['step']} {k}: {a[k]} != {b[k]} (rollouts differ)"
        for k, rel, tol in tolerances:
            assert math.isclose(a[k], b[k], rel_tol=rel, abs_tol=tol), f"{where}step {a['step']} {k}: {a[k]} vs {b[k]}"


HOLD_AFTER_STEP = "RAL_TEST_HOLD_AFTER_STEP"   # with HOLD_METRICS: see _hold_for_signal
HOLD_METRICS = "RAL_TEST_HOLD_METRICS"


def hold_env(run_dir: Path, after_step: int) -> dict:
    """``subprocess_env()`` for a run that a test stops with SIGTERM once ``after_step`` is in its metrics
    (scripts/slurm/ci_check.sh sets the same two variables for its SLURM job)."""
    return {**subprocess_env(), HOLD_AFTER_STEP: str(after_step), HOLD_METRICS: str(Path(run_dir) / "metrics.jsonl")}


def _hold_for_signal() -> None:
    """In a run started with ``hold_env``: once the metrics end at the named step, the rewards of the next
    step wait until this process's SIGTERM handler has run (at most 120 s). A tiny step takes a fraction of a
    second, so without the hold a signal sent "after step k" could land after the run's last step; with it the
    signal lands inside step k+1 every time, and the run stops there. The metrics are unchanged."""
    import signal
    import time

    after, metrics = os.environ.get(HOLD_AFTER_STEP), os.environ.get(HOLD_METRICS)
    if not after or not metrics:
        return
    try:
        steps = [json.loads(x)["step"] for x in Path(metrics).read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return
    if max(steps, default=0) != int(after):
        return
    flag = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)   # the trainer's PreemptionFlag
    deadline = time.monotonic() + 120
    while flag is not None and not flag.local and time.monotonic() < deadline:
        time.sleep(0.05)


def text_reward(response: str, record, template: str) -> float:
    """Share of the response's characters that are ASCII letters among its first 40 (in [0, 1])."""
    _hold_for_signal()
    text = response[:40]
    return sum(c.isascii() and c.isalpha() for c in text) / max(len(text), 1)


def make_assets(root: Path, preset: str, n_records: int = 16, seed: int = 0) -> dict:
    """HF checkpoint, its Megatron conversion and a synthetic dataset under ``root`` (made once)."""
    from megatron_ral.checkpoint.convert import hf_to_megatron
    from megatron_ral.tiny.checkpoint import make_tiny_checkpoint
    from megatron_ral.data.synthetic import make_synthetic_dataset

    hf, mcore, data = root / f"hf_{preset}", root / f"mcore_{preset}", root / "data"
    if not (hf / "config.json").is_file():
        make_tiny_checkpoint(hf, preset=preset, seed=seed)
    if not (mcore / "metadata.json").is_file():
        hf_to_megatron(hf, mcore, progress=False)
    if not (data / "train.json").is_file():
        make_synthetic_dataset(str(data), n_records, seed=seed)
    return {"hf": str(hf), "mcore": str(mcore), "data": str(data)}


def write_config(path: Path, assets: dict, run_dir: Path, **sections) -> Path:
    """A small RAL config over ``assets``; ``sections`` update it ({"algorithm": {...}, ...})."""
    data = Path(assets["data"])
    cfg = {
        "model": {"load": assets["mcore"], "dtype": "fp32"},
        "data": {"train_files": [str(data / "train.json")], "media_root": str(data), "num_workers": 0,
                 "shuffle": False, "max_frames": 4, "video_min_pixels": 3136, "video_max_pixels": 3136,
                 "image_min_pixels": 3136, "image_max_pixels": 3136},
        "algorithm": {"name": "ral", "rollouts_per_prompt": 4, "updates_per_rollout": 2, "kl_beta": 0.04,
                      "lambda_attn": 1.0, "reward_function": "trainer_fixture:text_reward"},
        "generation": {"max_new_tokens": 12, "temperature": 1.0},
        "optimizer": {"lr": 1e-3, "clip_grad": 1.0},
        "training": {"prompts_per_step": 4, "micro_batch_size": 2, "train_steps": 3, "run_dir": str(run_dir),
                     "eval_at_end": False},
        "checkpoint": {"save_interval": 0},
        "logging": {"wandb_mode": "disabled", "progress": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_training(config: str, overrides: list[str]) -> list[dict]:
    """``megatron_ral.cli.train.main`` in this rank (spawned by run_distributed); rank 0 returns metrics.jsonl."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    from megatron_ral.cli.train import main

    code = main(["--config", config, *overrides])
    assert code == 0, code
    if int(os.environ.get("RANK", "0")) != 0:
        return []
    import yaml as _yaml

    run_dir = Path(_yaml.safe_load(Path(config).read_text())["training"]["run_dir"])
    for o in overrides:
        if o.startswith("training.run_dir="):
            run_dir = Path(o.split("=", 1)[1])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


_CALLS = {"n": 0}


def nan_after_first_step(response: str, record, template: str) -> float:
    """``text_reward`` for the first 16 calls (one step of 4 prompts x 4 responses in one process), then NaN
    (a broken reward function): the loss of every later step is not finite."""
    _CALLS["n"] += 1
    return text_reward(response, record, template) if _CALLS["n"] <= 16 else float("nan")


def train_command(config: str, *overrides: str) -> list[str]:
    """The trainer's command line (one process)."""
    import sys

    return [sys.executable, "-m", "megatron_ral.train", "--config", config, *overrides]


def subprocess_env() -> dict:
    """Environment of a trainer subprocess: this file's directory importable (the reward functions)."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", MEGATRON_RAL_PROGRESS="0")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def even_records_only(response: str, record, template: str) -> float:
    """``text_reward`` for records with an even problem_id; 0.5 for every response to an odd one, so exactly
    the odd records' groups have zero reward variance (dynamic-sampling tests)."""
    return text_reward(response, record, template) if int(record.problem_id) % 2 == 0 else 0.5
