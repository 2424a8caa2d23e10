#!/usr/bin/env python
"""Video decode benchmark: DALI (CPU, VP9) vs PyAV on the same clips at 1 and 2 fps; prints JSON.

    python tools/bench/decode.py [--clips DIR] [--n 3] [--seconds 20] [--size 640x360] [--video-fps 30]

frames/s counts the Qwen-sampled frames per second of wall time (container probe + decode; PyAV on one
thread, DALI with its default 2 threads); frames_per_cpu_s divides by the process CPU time instead (less
sensitive to other load on a shared machine). Peak RSS is the peak resident memory of a fresh process
per measurement (the baseline after imports and the delta are reported too).
"""

from __future__ import annotations

import json
import os
import tempfile

from megatron_ral.arguments import ToolParser
from megatron_ral.data.video.benchmark import make_clips, run_decode_benchmark
from megatron_ral.entry import prog_name, run_main


def main(argv: list[str] | None = None) -> int:
    p = ToolParser(prog=prog_name("decode.py"), description=__doc__)
    p.add_argument("--clips", default=None, help="directory for the generated clips (default: a temp dir)")
    p.add_argument("--n", type=int, default=3, help="number of clips")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each clip")
    p.add_argument("--size", default="640x360", help="WIDTHxHEIGHT")
    p.add_argument("--video-fps", type=int, default=30, help="frame rate of the clips")
    p.add_argument("--fps", type=float, nargs="+", default=[1.0, 2.0], help="sampling rates to measure")
    p.add_argument("--backends", nargs="+", default=["dali", "pyav"], choices=["dali", "pyav"], help="decoders to measure")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per case")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    clips = args.clips or os.path.join(tempfile.gettempdir(), f"megatron_ral_decode_bench_{width}x{height}_{args.video_fps}_{args.seconds:g}s")
    paths = make_clips(clips, n=args.n, seconds=args.seconds, fps=args.video_fps, width=width, height=height)
    results = run_decode_benchmark(paths, backends=args.backends, fps_values=args.fps, repeats=args.repeats)
    print(json.dumps({"clips": {"n": args.n, "seconds": args.seconds, "size": f"{width}x{height}",
                                "video_fps": args.video_fps, "codec": "vp9"}, "results": results}))
    return 0


if __name__ == "__main__":
    run_main(prog_name("decode.py"), main)
