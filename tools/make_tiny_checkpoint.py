#!/usr/bin/env python
"""Write a randomly initialised Qwen2.5-VL checkpoint (HF format, with tokenizer and processor).

The command line lives in megatron_ral.cli.make_tiny_checkpoint (also installed as the console script `megatron-ral-make-tiny-checkpoint`);
`python tools/make_tiny_checkpoint.py --help` lists the options.
"""

from megatron_ral.cli.make_tiny_checkpoint import cli

if __name__ == "__main__":
    cli()
