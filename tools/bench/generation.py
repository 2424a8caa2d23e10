#!/usr/bin/env python
"""Generation benchmark: megatron_ral KV-cache generate() vs transformers generate(), one run, JSON out.

    python tools/bench/generation.py [--preset small] [--config-json '{"text_config": {...}}']
        [--batch 16] [--min-prompt 32] [--max-prompt 96] [--max-new-tokens 528] [--seed 0]

Same seeded weights (fp32), same batch of ragged text prompts, greedy, exactly --max-new-tokens per
row. Prints tokens/s, prefill time and median decode-step time around step 16 and step 512 for both,
their ratios, and whether the goals (>= 1.0x HF tokens/s; step 512 <= 1.3x step 16) are met.

The 'small' preset (hidden 256) is so narrow that attention over 600 cached tokens costs about as
much as the rest of a step; a model with Qwen2.5-VL-7B's proportions (head_dim 128, FFN 5.4x
hidden, GQA) gives the per-token compute a real model has:

    python tools/bench/generation.py --config-json '{"text_config": {"hidden_size": 1024,
        "intermediate_size": 5504, "num_attention_heads": 8, "num_key_value_heads": 2,
        "mrope_section": [16, 24, 24]}}'
"""

from __future__ import annotations

import json
import os

import torch

from megatron_ral.arguments import ToolParser
from megatron_ral.entry import prog_name, run_main
from megatron_ral import input_checks as check
from megatron_ral.inference.benchmark import run_generation_benchmark


def main(argv: list[str] | None = None) -> int:
    p = ToolParser(prog=prog_name("generation.py"), description=__doc__)
    p.add_argument("--preset", default="small", choices=["tiny", "small"], help="tiny checkpoint preset")
    p.add_argument("--config-json", default=None,
                   help="JSON text with Hugging Face config keys merged into the preset (as make_tiny_checkpoint.py "
                        "--config-json)")
    p.add_argument("--batch", type=int, default=16, help="prompts generated together")
    p.add_argument("--min-prompt", type=int, default=32, help="shortest prompt in tokens")
    p.add_argument("--max-prompt", type=int, default=96, help="longest prompt in tokens")
    p.add_argument("--max-new-tokens", type=int, default=528, help="tokens generated per prompt")
    p.add_argument("--seed", type=int, default=0, help="prompt and weight seed")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    overrides = check.json_text(args.config_json, "--config-json") if args.config_json else None
    result = run_generation_benchmark(
        preset=args.preset, config_overrides=overrides, batch=args.batch,
        prompt_lengths=(args.min_prompt, args.max_prompt), max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_main(prog_name("generation.py"), main)
