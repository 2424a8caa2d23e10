"""torchrun --nproc-per-node 2 tools/generate.py --tp 2: greedy output for a text chat prompt equals
transformers' generate() on the same converted tiny checkpoint; only rank 0 prints."""

from __future__ import annotations

import os

import pytest

from megatron_ral.testing.inference import converted_checkpoint, greedy_tool_and_hf

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_NEW = 10
TEXT = "Name three colours."


def test_tp2_text_greedy_equals_hf(tmp_path):
    hf_dir, mc_dir = converted_checkpoint(tmp_path, "tiny", seed=7)
    out, ids, _, processor = greedy_tool_and_hf(ROOT, hf_dir, mc_dir, TEXT, MAX_NEW, ["--tp", "2"], nproc=2)
    assert out["token_ids"] == ids
    assert out["text"] == processor.decode(ids, skip_special_tokens=True)
