"""``megatron-ral-make-synthetic-videos --out DIR --n N`` (tools/make_synthetic_videos.py).

Every flag is checked before torch is imported; the output is written all-or-nothing.
"""

from __future__ import annotations

import json
import os
from typing import NoReturn, Sequence

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_json, add_overwrite
from megatron_ral.cli.entry import prog_name, run_main
from megatron_ral.errors import UsageError

CODECS = ("vp9", "h264")  # data.synthetic.CODECS
MIN_SIDE = 16
KNOWN_TASKS = ("task_color_end", "task_direction", "task_count", "task_after", "image_color", "image_count",
               "task_brief_small")  # data.synthetic.TASKS (checked before torch/numpy imports; a test compares)


def parser() -> ToolParser:
    p = ToolParser(prog=prog_name("make_synthetic_videos.py"), description=(
        "Write a small synthetic Video-R1-format dataset: videos and images of coloured shapes that move, appear\n"
        "or change colour, multiple-choice and numerical questions with rationales, train.json / test.json\n"
        "(held-out split) with media paths relative to --out."))
    p.add_argument("--out", required=True, help="output directory (created; absent or empty)")
    p.add_argument("--n", type=int, required=True, help="number of records (videos + images)")
    p.add_argument("--codec", choices=CODECS, default="vp9", help="video codec (vp9 decodes with DALI on CPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")
    p.add_argument("--height", type=int, default=64, help="frame height in pixels (even)")
    p.add_argument("--width", type=int, default=96, help="frame width in pixels (even)")
    p.add_argument("--video-fps", type=int, default=8, help="frame rate of the written videos")
    p.add_argument("--image-fraction", type=float, default=0.25, help="share of records that are images")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share of records in test.json")
    p.add_argument("--tasks", default=None, help=(
        "comma-separated task names (default: the default mix; 'default' names it, e.g. default,task_brief_small "
        "adds the small-region/short-moment task; data.synthetic.TASKS lists them)"))
    add_overwrite(p)
    add_json(p, "the summary (out, train, test, counts, codec)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check.at_least(args.n, 1, "--n")
    for flag, side in (("--height", args.height), ("--width", args.width)):
        if side < MIN_SIDE or side % 2:
            raise UsageError(f"{flag} {side}: must be even and >= {MIN_SIDE} (yuv420p video)")
    if args.width <= args.height // 2:
        raise UsageError(f"--width {args.width}: must exceed half of --height ({args.height // 2}); the shapes are "
                         f"half the height wide")
    check.at_least(args.video_fps, 1, "--video-fps")
    check.fraction(args.image_fraction, "--image-fraction")
    if not 0 <= args.heldout_fraction < 1:
        raise UsageError(f"--heldout-fraction {args.heldout_fraction}: must be in [0, 1)")
    tasks = None
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        known = ("default",) + KNOWN_TASKS
        bad = [t for t in tasks if t not in known]
        if bad or not tasks:
            raise UsageError(f"--tasks {args.tasks!r}: unknown task {bad[0] if bad else '(none)'}; known: {', '.join(known)}")
    check.output_dir(args.out, "--out", args.overwrite)

    from megatron_ral.checkpoint.output_dir import atomic_output_dir
    from megatron_ral.data.synthetic import SyntheticSpec, make_synthetic_dataset

    spec = SyntheticSpec(height=args.height, width=args.width, video_fps=args.video_fps,
                         image_fraction=args.image_fraction, heldout_fraction=args.heldout_fraction)
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        summary = make_synthetic_dataset(str(tmp), args.n, codec=args.codec, seed=args.seed, spec=spec, tasks=tasks)
    summary.update(out=args.out, train=os.path.join(args.out, "train.json"), test=os.path.join(args.out, "test.json"))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: {summary['num_train']} train + {summary['num_test']} test records "
              f"({summary['num_videos']} {summary['codec']} videos, {summary['num_images']} images)")
    return 0


def cli() -> NoReturn:
    run_main(prog_name("make_synthetic_videos.py"), main)
