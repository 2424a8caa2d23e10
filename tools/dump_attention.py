#!/usr/bin/env python
"""Dump the last-layer attention-policy rows of a response continuation (RAL's p_theta).

The command line lives in megatron_ral.cli.dump_attention (also installed as the console script `megatron-ral-dump-attention`);
`python tools/dump_attention.py --help` lists the options.
"""

from megatron_ral.cli.dump_attention import cli

if __name__ == "__main__":
    cli()
