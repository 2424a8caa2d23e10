#!/usr/bin/env python
"""Convert a Hugging Face Qwen2.5-VL checkpoint into a Megatron-Core distributed checkpoint (torch_dist).

The command line lives in megatron_ral.cli.convert_hf_to_megatron (also installed as the console script `megatron-ral-convert-hf-to-megatron`);
`python tools/convert_hf_to_megatron.py --help` lists the options.
"""

from megatron_ral.cli.convert_hf_to_megatron import cli

if __name__ == "__main__":
    cli()
