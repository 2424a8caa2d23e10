"""torchrun --nproc-per-node 2 tools/dump_attention.py --pp 2 (layers split 2 + 1) on a converted tiny
checkpoint: the rows of a response after an image chat prompt, computed on the last stage and sent
to rank 0 (first stage), equal transformers' eager last-layer attention."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from megatron_ral.testing.attention import hf_attention_rows, run_dump_tool
from megatron_ral.inference.prompts import build_prompt
from megatron_ral.testing.inference import converted_checkpoint, load_hf_model

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = "Which colour dominates the picture?"
RESPONSE = "Mostly red, with a blue corner."


def test_pp2_image_rows_on_rank0_equal_hf(tmp_path):
    from PIL import Image

    hf_dir, mc_dir = converted_checkpoint(tmp_path, "tiny", seed=14)
    image = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, size=(84, 112, 3), dtype=np.uint8)).save(image)
    out_file = tmp_path / "rows.pt"
    proc = run_dump_tool(ROOT, ["--ckpt", str(mc_dir), "--tp", "1", "--pp", "2", "--prompt", TEXT,
                                "--image", str(image), "--response", RESPONSE, "--out", str(out_file),
                                "--json"], nproc=2)
    summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.strip()][-1])
    out = torch.load(out_file)
    prompt, processor = build_prompt(hf_dir, TEXT, image=str(image))
    resp = processor.tokenize(RESPONSE)
    assert prompt.image_grid_thw is not None
    assert "settings" in summary  # the data settings used and where they came from
    assert {k: v for k, v in summary.items() if k != "settings"} == {
        "out": str(out_file), "rows": [len(resp), len(prompt) + len(resp)], "prompt_length": len(prompt)}
    assert out["input_ids"].tolist() == prompt.input_ids.tolist() + resp
    ref = hf_attention_rows(load_hf_model(hf_dir), prompt, resp)
    assert (out["rows"].double() - ref).abs().max().item() <= 1e-5
