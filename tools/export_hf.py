#!/usr/bin/env python
"""A training run's checkpoint as a Hugging Face directory, loaded and (--verify) checked against it.

The command line lives in megatron_ral.cli.export_hf (also installed as the console script `megatron-ral-export-hf`);
`python tools/export_hf.py --help` lists the options.
"""

from megatron_ral.cli.export_hf import cli

if __name__ == "__main__":
    cli()
