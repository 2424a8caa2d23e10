"""RAL + on-policy distillation in the trainer (algorithm.name: ral_distill), tiny student and a larger teacher
(the ``small`` preset: 4 layers to 3, 4x the width, twice the heads, tied embeddings).

* the same rollouts and the same distillation metrics at TP=2 (the teacher converted from its HF directory,
  its weights on the host between passes), at DP=2 and at PP=2 (student split 2+1, teacher split 3+1 on the same two stages) as at TP=1, three steps;
* over those three steps the attention JSD to the teacher falls;
* a teacher of another vocabulary or another merge size is refused at start-up with one line (exit 2);
* a run stopped by SIGTERM and resumed gives the uninterrupted run's metrics bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time

import pytest

import trainer_fixture as tf
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

DISTILL = {"name": "ral_distill", "gkd_mu": 0.2, "gamma_attn": 5.0, "lambda_attn": 1.0, "kl_beta": 0.04}
# quantities computed directly agree to ~1e-7 relative between layouts (float32 sums in another order)
TOLERANCES = (("distill/gkd", 1e-5, 0.0), ("distill/attn_jsd_teacher", 1e-5, 0.0), ("loss/gkd", 1e-5, 0.0),
              ("loss/distill_attn", 1e-5, 0.0), ("loss/total", 1e-5, 1e-6), ("loss/policy", 1e-5, 1e-5),
              ("loss/attn", 1e-5, 1e-9), ("train/grad_norm", 1e-5, 0.0))
SAME_ROLLOUT = ("reward/total", "response/length_mean")
DISTILL_KEYS = ("distill/attn_jsd_teacher", "distill/gkd", "loss/distill_attn", "loss/gkd", "perf/teacher_s",
                "perf/teacher_peak_mem_gib")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return {"root": root, "student": tf.make_assets(root, "tiny"), "teacher": tf.make_assets(root, "small", seed=3)}


def _config(assets, name: str, algorithm: dict | None = None, **sections) -> tuple[str, object]:
    root = assets["root"]
    alg = {**DISTILL, "teacher_load": assets["teacher"]["mcore"], **(algorithm or {})}
    path = tf.write_config(root / f"{name}.yaml", assets["student"], root / name, algorithm=alg, **sections)
    return str(path), root / name


def _run(assets, name: str, world: int, overrides: list[str], **sections) -> list[dict]:
    cfg, _ = _config(assets, name, checkpoint={"save_final": False}, **sections)
    return run_distributed(tf.run_training, world, cfg, overrides, timeout=900)[0]


def _assert_same(ref: list[dict], got: list[dict], label: str) -> None:
    tf.assert_same_metrics(ref, got, 3, label, tolerances=TOLERANCES, same_rollout=SAME_ROLLOUT)


def test_distillation_metrics_at_tp2_dp2_and_pp2_equal_tp1_and_the_jsd_to_the_teacher_falls(assets):
    ref = _run(assets, "tp1", 1, [])
    for row in ref:
        assert all(k in row and math.isfinite(row[k]) for k in DISTILL_KEYS), sorted(row)
        assert row["distill/gkd"] > 0.1 and row["distill/attn_jsd_teacher"] > 1e-3   # a teacher unlike the student
    jsd = [r["distill/attn_jsd_teacher"] for r in ref]
    assert jsd[2] < 0.92 * jsd[0] and jsd[1] < jsd[0], f"the attention JSD to the teacher did not fall: {jsd}"
    # TP=2 with the teacher given as its HF directory (converted once into the run directory by rank 0) and
    # kept in host memory between teacher passes
    tp2 = _run(assets, "tp2", 2, ["parallel.tensor_model_parallel_size=2", "algorithm.teacher_placement=host",
                                  "algorithm.teacher_load=", f"algorithm.teacher_hf_path={assets['teacher']['hf']}"])
    _assert_same(ref, tp2, "TP=2 (teacher from HF, on the host)")
    assert (assets["root"] / "tp2" / "teacher_mcore" / ".converted_from.json").is_file()
    _assert_same(ref, _run(assets, "dp2", 2, []), "DP=2")
    _assert_same(ref, _run(assets, "pp2", 2, ["parallel.pipeline_model_parallel_size=2",
                                              "parallel.pipeline_layer_split=[2,1]",
                                              "algorithm.teacher_pipeline_layer_split=[3,1]"]), "PP=2")


def _incompatible_teacher(assets, name: str, change) -> str:
    src = assets["root"] / "hf_small"
    out = assets["root"] / name
    out.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy2(f, out / f.name)
    config = json.loads((out / "config.json").read_text())
    change(config)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


@pytest.mark.parametrize("case", ["vocabulary", "merge_size"])
def test_an_incompatible_teacher_is_refused_at_start_up_with_one_line(assets, case):
    change = {"vocabulary": lambda c: c["text_config"].update(vocab_size=1152),
              "merge_size": lambda c: c["vision_config"].update(spatial_merge_size=1)}[case]
    expected = {"vocabulary": "vocab_size is 1152 in the teacher, 1024 in the student",
                "merge_size": "vision_config.spatial_merge_size is 1 in the teacher, 2 in the student"}[case]
    teacher = _incompatible_teacher(assets, f"bad_{case}", change)
    cfg, run_dir = _config(assets, f"refused_{case}", algorithm={"teacher_load": "", "teacher_hf_path": teacher})
    out = subprocess.run(tf.train_command(cfg), env=tf.subprocess_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert errors[0].startswith("megatron-ral-train: error: config error: algorithm.teacher_hf_path: the teacher")
    assert expected in errors[0], errors[0]
    assert not (run_dir / "teacher_mcore").exists()   # refused before any conversion


def _comparable(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows}


def test_a_distillation_run_stopped_by_sigterm_resumes_bit_exact(assets):
    steps = {"training": {"train_steps": 4}, "checkpoint": {"save_interval": 0}}
    full_cfg, full_dir = _config(assets, "full", **steps)
    subprocess.run(tf.train_command(full_cfg), env=tf.subprocess_env(), check=True, capture_output=True, timeout=600)
    full = _comparable(tf.read_metrics(full_dir))
    assert sorted(full) == [1, 2, 3, 4] and all(r["distill/gkd"] > 0 for r in full.values())

    cfg, run_dir = _config(assets, "stopped", **steps)
    proc = subprocess.Popen(tf.train_command(cfg), env=tf.hold_env(run_dir, 1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not any(r["step"] >= 1 for r in tf.read_metrics(run_dir)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    last = max(_comparable(tf.read_metrics(run_dir)))
    assert last == 2, f"the signal, sent in step 2, should stop the run there (stopped after step {last})"

    done = subprocess.run(tf.train_command(cfg), env=tf.subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr
    resumed = _comparable(tf.read_metrics(run_dir))
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert resumed[step] == full[step], f"step {step} differs after resuming at step {last}"
