"""tools/dump_attention.py as a single process on a converted tiny checkpoint: the saved rows of a
response after a video chat prompt (built by the data pipeline from an H.264 file) equal transformers'
eager last-layer attention (head mean, renormalised over i < t). Bad inputs: tests/e2e/test_cli_bad_inputs.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megatron_ral.testing.attention import hf_attention_rows, run_dump_tool
from megatron_ral.inference.prompts import build_prompt
from megatron_ral.testing.inference import converted_checkpoint, load_hf_model

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = "What happens in this video?"
RESPONSE = "<think>The square moves.</think><answer>B</answer>"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from megatron_ral.data.synthetic import write_video

    root = tmp_path_factory.mktemp("dump_tool")
    hf_dir, mc_dir = converted_checkpoint(root, "tiny", seed=13)
    frames = np.random.default_rng(3).integers(0, 255, size=(8, 56, 84, 3), dtype=np.uint8)
    video = root / "clip.mp4"
    write_video(str(video), frames, fps=4, codec="h264")
    return root, hf_dir, mc_dir, video


def test_video_rows_equal_hf(ckpt):
    root, hf_dir, mc_dir, video = ckpt
    out_file = root / "rows.pt"
    proc = run_dump_tool(ROOT, ["--ckpt", str(mc_dir), "--prompt", TEXT, "--video", str(video),
                                "--response", RESPONSE, "--out", str(out_file)])
    assert "wrote" in proc.stdout
    out = torch.load(out_file)
    prompt, processor = build_prompt(hf_dir, TEXT, video=str(video))
    resp = processor.tokenize(RESPONSE)
    assert prompt.video_grid_thw is not None and len(prompt) > 50
    assert out["prompt_length"] == len(prompt)
    assert out["input_ids"].dtype == torch.int64
    assert out["input_ids"].tolist() == prompt.input_ids.tolist() + resp
    rows = out["rows"]
    assert rows.dtype == torch.float32 and rows.shape == (len(resp), len(prompt) + len(resp))
    ref = hf_attention_rows(load_hf_model(hf_dir), prompt, resp)
    assert (rows.double() - ref).abs().max().item() <= 1e-5
    plen = len(prompt)
    for r in range(len(resp)):
        assert (rows[r, plen + r:] == 0).all()
        assert abs(rows[r].sum().item() - 1.0) < 1e-5

