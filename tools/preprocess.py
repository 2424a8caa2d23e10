#!/usr/bin/env python
"""Turn one video or image plus a prompt into Qwen2.5-VL model inputs saved with torch.save.

The command line lives in megatron_ral.cli.preprocess (also installed as the console script `megatron-ral-preprocess`);
`python tools/preprocess.py --help` lists the options.
"""

from megatron_ral.cli.preprocess import cli

if __name__ == "__main__":
    cli()
