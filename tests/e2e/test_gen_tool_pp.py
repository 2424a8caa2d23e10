"""torchrun --nproc-per-node 2 tools/generate.py --pp 2: greedy output for an image chat prompt equals
transformers' generate() on the same converted tiny checkpoint (activations cross the stages, the
tokens come back from the last stage; rank 0, on the first stage, prints)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_ral.inference.cli import build_prompt
from megatron_ral.inference.loading import stop_token_ids
from megatron_ral.inference.testing import (
    converted_checkpoint,
    hf_generate,
    load_hf_model,
    run_generate_tool,
    tool_json,
)

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_NEW = 10
TEXT = "Describe the picture."


def test_pp2_image_greedy_equals_hf(tmp_path):
    from PIL import Image

    hf_dir, mc_dir = converted_checkpoint(tmp_path, "small", seed=8)
    image = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, size=(84, 112, 3), dtype=np.uint8)).save(image)
    out = tool_json(run_generate_tool(ROOT, ["--ckpt", str(mc_dir), "--pp", "2", "--prompt", TEXT,
                                             "--image", str(image), "--max-new-tokens", str(MAX_NEW),
                                             "--greedy", "--json"], nproc=2))
    prompt, processor = build_prompt(hf_dir, TEXT, image=str(image))
    assert prompt.image_grid_thw is not None
    ids = hf_generate(load_hf_model(hf_dir), prompt, MAX_NEW, stop_token_ids(hf_dir, processor.tokenizer))
    assert out["token_ids"] == ids
    assert out["text"] == processor.decode(ids, skip_special_tokens=True)
