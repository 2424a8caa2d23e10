#!/usr/bin/env python
"""Colour conversion figures: the decoders' RGB against FFmpeg's, in 8-bit levels; prints JSON.

    python tools/bench/colour.py [--out DIR] [--frames 4] [--size 640x360]

Writes small tagged H.264 / VP9 clips (640x360, BT.601 / BT.709, limited / full range, plus untagged SD
and HD) and reports the differences listed in megatron_ral/data/video/colour_benchmark.py (README,
"Video decoding").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from megatron_ral.data.video.colour_benchmark import run_colour_benchmark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for the generated clips (default: a temp dir)")
    p.add_argument("--frames", type=int, default=4, help="frames per clip")
    p.add_argument("--size", default="640x360", help="WIDTHxHEIGHT of the tagged clips (the untagged HD clip is 1280x720)")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    out = args.out or os.path.join(tempfile.gettempdir(), "megatron_ral_colour_bench")
    print(json.dumps(run_colour_benchmark(out, frames=args.frames, size=(height, width))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
