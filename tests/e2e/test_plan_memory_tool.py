"""tools/plan_memory.py end to end: the table and --json of a layout (the same numbers as the library), an HF
config.json as the model, the --gpus search, and one-line errors (exit 2) for bad flags, models and layouts.
The command never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ral.models.qwen25vl.memory import load_shape
from megatron_ral.rl.memory_plan import Layout, Settings, Workload, plan_memory

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(ROOT / "tools" / "plan_memory.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_json_is_the_library_plan():
    r = _run("--student", "7b", "--teacher", "32b", "--tp", "4", "--pp", "2", "--frames", "128",
             "--response-len", "1024", "--reference", "host", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    plan = plan_memory(load_shape("7b"), load_shape("32b"), Layout(tp=4, pp=2),
                       Workload(frames=128, response_len=1024), Settings(reference="host"), 80.0)
    assert out == json.loads(json.dumps(plan.to_dict()))
    assert [s["layers"] for s in out["stages"]] == [14, 14] and [s["teacher_layers"] for s in out["stages"]] == [32, 32]
    assert out["sequence"]["video_tokens"] == 64 * 128 and out["sequence"]["length"] == 64 * 128 + 256 + 2 + 1024
    assert out["stages"][0]["resident"]["reference"] == 0 and out["stages"][0]["host"]["reference"] > 0
    assert isinstance(out["fits"], bool) and out["fits_recompute"] is True


def test_table_and_hf_config(tmp_path):
    from megatron_ral.testing.models import tiny_hf_config

    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config("small").to_dict()))
    r = _run("--student", str(tmp_path), "--dtype", "fp32", "--spec", "local", "--frames", "8",
             "--pixels-per-frame", str(56 * 84), "--response-len", "64", "--gpu-mem-gib", "24", "--reserve-gib", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{tmp_path}: TP 1 x PP 1 x CP 1 x DP 1 = 1 GPUs of 24 GiB")
    for label in ("weights", "gradients (fp32 buffer)", "optimizer state (Adam)", "reference weights", "p_old store",
                  "generation: KV cache + prefill", "update activations", "peak"):
        assert any(ln.startswith(label) for ln in lines), label
    assert "fits in 23 GiB: yes without recompute, yes with full recompute" in lines


def test_gpus_lists_layouts_best_first():
    r = _run("--student", "7b", "--teacher", "32b", "--gpus", "8", "--frames", "512", "--json")
    assert r.returncode == 0, r.stderr
    layouts = json.loads(r.stdout)["layouts"]
    assert layouts and all(p["layout"]["world"] == 8 for p in layouts)
    assert all(p["layout"]["tp"] <= 8 for p in layouts)
    fits = [(not p["fits"], not p["fits_recompute"]) for p in layouts]
    assert fits == sorted(fits)
    text = _run("--student", "7b", "--gpus", "16", "--frames", "128")
    assert text.returncode == 0 and "TP  PP  CP  DP" in text.stdout


@pytest.mark.parametrize("args, message", [
    (["--student", "7b", "--tp", "3"], "layout: Qwen2.5-VL-7B: tensor parallel size 3 must divide the attention heads"),
    (["--student", "7b", "--teacher", "32b", "--tp", "8"], "layout: Qwen2.5-VL-7B: tensor parallel size 8"),
    (["--student", "/nonexistent"], "--student: /nonexistent: neither a preset"),
    (["--student", "7b", "--pp", "2", "--pp-split", "10,10"], "--pp-split 10,10: needs 2 non-negative entries summing to 28"),
    (["--student", "7b", "--pp-split", "a,b"], "--pp-split a,b: expected comma-separated integers"),
    (["--student", "7b", "--frames", "-1"], "--frames -1: must be >= 0"),
    (["--student", "7b", "--pixels-per-frame", "100"], "--pixels-per-frame 100: below one 28x28 cell"),
    (["--student", "7b", "--gpu-mem-gib", "2"], "--gpu-mem-gib 2.0: must exceed --reserve-gib"),
    (["--student", "7b", "--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--tp", "2"], "the following arguments are required: --student"),
])
def test_bad_input_is_one_line(args, message, tmp_path):
    r = _run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plan_memory.py: error: "), r.stderr
    assert message in lines[0], lines[0]


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    r = _run("--student", str(tmp_path / "config.json"))
    assert r.returncode == 2 and "not valid JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = _run("--student", str(tmp_path))
    assert r.returncode == 2 and "unsupported architecture" in r.stderr


def test_no_torch_import():
    code = ("import sys\nfrom megatron_ral.cli.plan_memory import main\n"
            "main(['--student', '7b', '--teacher', '32b', '--gpus', '16', '--json'])\n"
            "print(sorted(m for m in ('torch', 'transformers', 'megatron.core') if m in sys.modules), file=sys.stderr)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.strip() == "[]", r.stderr
    assert json.loads(r.stdout)["gpus"] == 16
