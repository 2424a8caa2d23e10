#!/usr/bin/env python
"""Write a small synthetic Video-R1-format dataset (videos, images, train/test records).

The command line lives in megatron_ral.cli.make_synthetic_videos (also installed as the console script `megatron-ral-make-synthetic-videos`);
`python tools/make_synthetic_videos.py --help` lists the options.
"""

from megatron_ral.cli.make_synthetic_videos import cli

if __name__ == "__main__":
    cli()
