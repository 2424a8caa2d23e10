"""tools/convert_hf_to_megatron.py and tools/convert_megatron_to_hf.py end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_ral.checkpoint.safetensors_io import HFCheckpointReader
from megatron_ral.tiny.checkpoint import make_tiny_checkpoint

TOOLS = Path(__file__).resolve().parents[2] / "tools"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _run(tool, *args):
    return subprocess.run([sys.executable, str(TOOLS / tool), *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300)


def test_tools_round_trip(tmp_path):
    hf = make_tiny_checkpoint(tmp_path / "hf", seed=5)
    res = _run("convert_hf_to_megatron.py", "--hf", hf, "--out", tmp_path / "mc", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["out"] == str(tmp_path / "mc")
    assert "[hf->megatron]" in res.stderr and "layer 3/3" in res.stderr
    res = _run("convert_megatron_to_hf.py", "--ckpt", tmp_path / "mc", "--out", tmp_path / "back",
               "--max-shard-gb", "0.0002")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"wrote {tmp_path / 'back'}: ")  # without --json: one human-readable line
    assert "[megatron->hf]" in res.stderr
    a, b = HFCheckpointReader(hf), HFCheckpointReader(tmp_path / "back")
    assert sorted(a.names()) == sorted(b.names())
    assert all(torch.equal(a.get(n), b.get(n)) and a.get(n).dtype == b.get(n).dtype for n in a.names())
    assert len(list((tmp_path / "back").glob("model-*-of-*.safetensors"))) > 1

    from transformers import Qwen2_5_VLForConditionalGeneration

    Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "back"))


def test_tool_errors_are_one_line(tmp_path):
    hf = make_tiny_checkpoint(tmp_path / "hf", seed=5)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (hf / "config.json").write_text(json.dumps(cfg))
    res = _run("convert_hf_to_megatron.py", "--hf", hf, "--out", tmp_path / "mc")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "Traceback" not in res.stderr
    assert res.stderr.startswith("convert_hf_to_megatron.py: error: ")
    assert "mistral" in res.stderr and not (tmp_path / "mc").exists()
    res = _run("convert_megatron_to_hf.py", "--ckpt", hf, "--out", tmp_path / "back")
    assert res.returncode == 2 and "not a Megatron one" in res.stderr
