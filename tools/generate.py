#!/usr/bin/env python
"""Generate a response with the Megatron Qwen2.5-VL model (KV cache, TP/PP; torchrun for TP x PP > 1).

The command line lives in megatron_ral.cli.generate (also installed as the console script `megatron-ral-generate`);
`python tools/generate.py --help` lists the options.
"""

from megatron_ral.cli.generate import cli

if __name__ == "__main__":
    cli()
