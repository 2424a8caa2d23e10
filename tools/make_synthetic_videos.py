#!/usr/bin/env python
"""Write a small synthetic Video-R1-format dataset (videos, images, train/test records).

The command line lives in megatron_ral.data.cli (also installed as the console script `megatron-ral-make-synthetic-videos`);
`python tools/make_synthetic_videos.py --help` lists the options.
"""

from megatron_ral.data.cli import synthetic_cli

if __name__ == "__main__":
    synthetic_cli()
