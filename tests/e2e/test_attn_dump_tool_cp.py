"""torchrun --nproc-per-node 2 tools/dump_attention.py --cp 2 on a converted tiny checkpoint: the sequence (an
image chat prompt and a response, a length that is not a multiple of 2C) is split over two context-parallel
ranks, each computing the rows of the response tokens it holds; rank 0 writes the same file as a single
process (rows of the whole response, prompt length, input ids), whose rows equal transformers' eager
last-layer attention."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from megatron_ral.inference.prompts import build_prompt
from megatron_ral.testing.attention import hf_attention_rows, run_dump_tool
from megatron_ral.testing.inference import converted_checkpoint, load_hf_model

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = "Which colour dominates the picture?"
RESPONSE = "Mostly red, with a blue corner and a thin green stripe."


def test_cp2_image_rows_on_rank0_equal_hf(tmp_path):
    from PIL import Image

    hf_dir, mc_dir = converted_checkpoint(tmp_path, "tiny", seed=15)
    image = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 255, size=(84, 112, 3), dtype=np.uint8)).save(image)
    out_file = tmp_path / "rows.pt"
    proc = run_dump_tool(ROOT, ["--ckpt", str(mc_dir), "--cp", "2", "--prompt", TEXT, "--image", str(image),
                                "--response", RESPONSE, "--out", str(out_file), "--json"], nproc=2)
    summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.strip()][-1])
    out = torch.load(out_file)
    prompt, processor = build_prompt(hf_dir, TEXT, image=str(image))
    resp = processor.tokenize(RESPONSE)
    total = len(prompt) + len(resp)
    assert total % 4 != 0  # the split pads the sequence
    assert {k: summary[k] for k in ("out", "rows", "prompt_length")} == {
        "out": str(out_file), "rows": [len(resp), total], "prompt_length": len(prompt)}
    assert out["input_ids"].tolist() == prompt.input_ids.tolist() + resp
    ref = hf_attention_rows(load_hf_model(hf_dir), prompt, resp)
    assert (out["rows"].double() - ref).abs().max().item() <= 1e-5
    for r in range(len(resp)):
        assert abs(out["rows"][r].sum().item() - 1.0) < 1e-5


def test_cp_process_count_is_checked(tmp_path):
    hf_dir, mc_dir = converted_checkpoint(tmp_path, "tiny", seed=15)
    proc = run_dump_tool(ROOT, ["--ckpt", str(mc_dir), "--cp", "2", "--prompt", TEXT, "--response", RESPONSE,
                                "--out", str(tmp_path / "rows.pt")], expect_rc=2)
    assert "1 process(es) but --tp 1 x --pp 1 x --cp 2 = 2; run torchrun --nproc-per-node 2" in proc.stderr
