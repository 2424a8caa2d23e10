#!/usr/bin/env python
"""Convert a Megatron-Core distributed checkpoint (any TP/PP) into a Hugging Face Qwen2.5-VL directory.

The command line lives in megatron_ral.checkpoint.cli (also installed as the console script `megatron-ral-convert-megatron-to-hf`);
`python tools/convert_megatron_to_hf.py --help` lists the options.
"""

from megatron_ral.checkpoint.cli import megatron_to_hf_cli

if __name__ == "__main__":
    megatron_to_hf_cli()
