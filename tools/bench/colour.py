#!/usr/bin/env python
"""Colour conversion figures: the decoders' RGB against FFmpeg's, in 8-bit levels; prints JSON.

The benchmark lives in megatron_ral.bench.colour; `python tools/bench/colour.py --help` lists the options.
"""

from megatron_ral.bench.colour import cli

if __name__ == "__main__":
    cli()
