"""torchrun --nproc-per-node 2 tools/generate.py --pp 2: greedy output for an image chat prompt equals
transformers' generate() on the same converted tiny checkpoint (activations cross the stages, the
tokens come back from the last stage; rank 0, on the first stage, prints)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_ral.testing.inference import converted_checkpoint, greedy_tool_and_hf

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_NEW = 10
TEXT = "Describe the picture."


def test_pp2_image_greedy_equals_hf(tmp_path):
    from PIL import Image

    hf_dir, mc_dir = converted_checkpoint(tmp_path, "small", seed=8)
    image = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, size=(84, 112, 3), dtype=np.uint8)).save(image)
    out, ids, prompt, processor = greedy_tool_and_hf(ROOT, hf_dir, mc_dir, TEXT, MAX_NEW, ["--pp", "2"], nproc=2,
                                                     image=str(image))
    assert prompt.image_grid_thw is not None
    assert out["token_ids"] == ids
    assert out["text"] == processor.decode(ids, skip_special_tokens=True)
