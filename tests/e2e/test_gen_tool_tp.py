"""torchrun --nproc-per-node 2 tools/generate.py --tp 2: greedy output for a text chat prompt equals
transformers' generate() on the same converted tiny checkpoint; only rank 0 prints."""

from __future__ import annotations

import os

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
TEXT = "Name three colours."


def test_tp2_text_greedy_equals_hf(tmp_path):
    hf_dir, mc_dir = converted_checkpoint(tmp_path, "tiny", seed=7)
    out = tool_json(run_generate_tool(ROOT, ["--ckpt", str(mc_dir), "--tp", "2", "--prompt", TEXT,
                                             "--max-new-tokens", str(MAX_NEW), "--greedy", "--json"], nproc=2))
    prompt, processor = build_prompt(hf_dir, TEXT)
    ids = hf_generate(load_hf_model(hf_dir), prompt, MAX_NEW, stop_token_ids(hf_dir, processor.tokenizer))
    assert out["token_ids"] == ids
    assert out["text"] == processor.decode(ids, skip_special_tokens=True)
