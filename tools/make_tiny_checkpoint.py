#!/usr/bin/env python
"""Write a randomly initialised Qwen2.5-VL checkpoint (HF format, with tokenizer and processor).

The command line lives in megatron_ral.checkpoint.cli (also installed as the console script `megatron-ral-make-tiny-checkpoint`);
`python tools/make_tiny_checkpoint.py --help` lists the options.
"""

from megatron_ral.checkpoint.cli import make_tiny_cli

if __name__ == "__main__":
    make_tiny_cli()
