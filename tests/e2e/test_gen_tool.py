"""tools/generate.py as a single process (python tools/generate.py): greedy output for a video prompt
equals transformers' generate() on the same converted tiny checkpoint and the same chat prompt
(built by the data pipeline from the decoded video). Bad flags: tests/e2e/test_cli_bad_inputs.py."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_ral.testing.inference import converted_checkpoint, greedy_tool_and_hf

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_NEW = 10
TEXT = "What happens in this video?"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from megatron_ral.data.synthetic import write_video

    root = tmp_path_factory.mktemp("gen_tool")
    hf_dir, mc_dir = converted_checkpoint(root, "tiny", seed=6)
    frames = np.random.default_rng(0).integers(0, 255, size=(8, 56, 84, 3), dtype=np.uint8)
    video = root / "clip.mp4"
    write_video(str(video), frames, fps=4, codec="h264")
    return hf_dir, mc_dir, video


def test_video_greedy_json_equals_hf(ckpt):
    hf_dir, mc_dir, video = ckpt
    out, ids, prompt, processor = greedy_tool_and_hf(ROOT, hf_dir, mc_dir, TEXT, MAX_NEW, video=str(video))
    assert out["token_ids"] == ids
    assert out["text"] == processor.decode(ids, skip_special_tokens=True)
    assert out["prompt_length"] == len(prompt) > 100  # the video's placeholder tokens are in the prompt
    assert out["finish_reason"] in ("stop", "length")

