#!/usr/bin/env python
"""Held-out accuracy of a Megatron checkpoint: greedy answers scored with the training reward parser.

The command line lives in megatron_ral.cli.evaluate (also installed as the console script `megatron-ral-evaluate`);
`python tools/evaluate.py --help` lists the options.
"""

from megatron_ral.cli.evaluate import cli

if __name__ == "__main__":
    cli()
