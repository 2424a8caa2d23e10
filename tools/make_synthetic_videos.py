#!/usr/bin/env python
"""Write a small synthetic Video-R1-format dataset (videos, images, train/test records).

    python tools/make_synthetic_videos.py --out DIR --n N [--codec vp9|h264] [--seed S]
"""

from __future__ import annotations

import argparse
import json

from megatron_ral.data.synthetic import SyntheticSpec, make_synthetic_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (records use paths relative to it)")
    p.add_argument("--n", type=int, required=True, help="number of records (videos + images)")
    p.add_argument("--codec", choices=["vp9", "h264"], default="vp9", help="video codec (vp9 decodes with DALI on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--video-fps", type=int, default=8)
    p.add_argument("--image-fraction", type=float, default=0.25, help="share of records that are images")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share of records in test.json")
    args = p.parse_args(argv)
    spec = SyntheticSpec(
        height=args.height, width=args.width, video_fps=args.video_fps,
        image_fraction=args.image_fraction, heldout_fraction=args.heldout_fraction,
    )
    summary = make_synthetic_dataset(args.out, args.n, codec=args.codec, seed=args.seed, spec=spec)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
