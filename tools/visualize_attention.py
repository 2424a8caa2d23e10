#!/usr/bin/env python
"""Pictures of where a model attends (attention mass per video frame, heatmaps over the patches) and of a
run's training curves.

The command line lives in megatron_ral.cli.visualize_attention (also installed as the console script
`megatron-ral-visualize-attention`); `python tools/visualize_attention.py --help` lists the options.
"""

from megatron_ral.cli.visualize_attention import cli

if __name__ == "__main__":
    cli()
