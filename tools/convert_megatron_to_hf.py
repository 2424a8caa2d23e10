#!/usr/bin/env python
"""Convert a Megatron-Core distributed checkpoint (any TP/PP) into a Hugging Face Qwen2.5-VL directory.

The command line lives in megatron_ral.cli.convert_megatron_to_hf (also installed as the console script `megatron-ral-convert-megatron-to-hf`);
`python tools/convert_megatron_to_hf.py --help` lists the options.
"""

from megatron_ral.cli.convert_megatron_to_hf import cli

if __name__ == "__main__":
    cli()
