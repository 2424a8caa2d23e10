#!/usr/bin/env python
"""Generate a response with the megatron Qwen2.5-VL model from a dist checkpoint (KV cache, TP/PP).

    torchrun --nproc-per-node N tools/generate.py --ckpt CKPT --tp T --pp P --prompt TEXT
        [--image FILE | --video FILE] [--max-new-tokens K] [--greedy | --temperature X --top-p Y]
        [--seed S] [--json]

Also runs as a plain single process (python tools/generate.py ...). With --json, rank 0 prints one
JSON object: token_ids (generated ids only), text, finish_reason, prompt_tokens.
"""

import sys

from megatron_ral.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
