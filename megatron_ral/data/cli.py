"""Command lines of the data tools (tools/*.py and the megatron-ral-* console scripts call these).

    megatron-ral-make-synthetic-videos  --out DIR --n N          (tools/make_synthetic_videos.py)
    megatron-ral-preprocess             --hf DIR --video F ...   (tools/preprocess.py)

Every flag, path and media file is checked before torch is imported; outputs are written all-or-nothing.
"""

from __future__ import annotations

import json
import os
from typing import NoReturn, Sequence

from megatron_ral import input_checks as check
from megatron_ral.arguments import ToolParser, add_json, add_media, add_overwrite
from megatron_ral.entry import prog_name, run_main
from megatron_ral.errors import UsageError

CODECS = ("vp9", "h264")  # data.synthetic.CODECS
BACKENDS = ("auto", "dali", "pyav")
MIN_SIDE = 16


# --- make_synthetic_videos --------------------------------------------------------------------------

def synthetic_parser() -> ToolParser:
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
    add_overwrite(p)
    add_json(p, "the summary (out, train, test, counts, codec)")
    return p


def synthetic_main(argv: Sequence[str] | None = None) -> int:
    args = synthetic_parser().parse_args(argv)
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
    check.output_dir(args.out, "--out", args.overwrite)

    from megatron_ral.checkpoint.output_dir import atomic_output_dir
    from megatron_ral.data.synthetic import SyntheticSpec, make_synthetic_dataset

    spec = SyntheticSpec(height=args.height, width=args.width, video_fps=args.video_fps,
                         image_fraction=args.image_fraction, heldout_fraction=args.heldout_fraction)
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        summary = make_synthetic_dataset(str(tmp), args.n, codec=args.codec, seed=args.seed, spec=spec)
    summary.update(out=args.out, train=os.path.join(args.out, "train.json"), test=os.path.join(args.out, "test.json"))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: {summary['num_train']} train + {summary['num_test']} test records "
              f"({summary['num_videos']} {summary['codec']} videos, {summary['num_images']} images)")
    return 0


def synthetic_cli() -> NoReturn:
    run_main(prog_name("make_synthetic_videos.py"), synthetic_main)


# --- preprocess -------------------------------------------------------------------------------------

def preprocess_parser() -> ToolParser:
    p = ToolParser(prog=prog_name("preprocess.py"), description=(
        "Turn one video or image plus a prompt into Qwen2.5-VL model inputs, saved with torch.save.\n\n"
        "The saved dict holds input_ids, attention_mask, pixel_values (image) or pixel_values_videos (video),\n"
        "image_grid_thw / video_grid_thw, second_per_grid_ts (video), position_ids (3-row M-RoPE ids),\n"
        "frame_indices (video) and meta (codec, backend, sizes)."))
    p.add_argument("--hf", required=True,
                   help="Hugging Face checkpoint directory (tokenizer, chat template, preprocessor config); a "
                        "converted Megatron checkpoint carries these files too")
    add_media(p, required=True)
    p.add_argument("--prompt", default=None, help="user text after the media (default: 'Describe this video/image.')")
    p.add_argument("--fps", type=float, default=2.0, help="video sampling rate (qwen-vl-utils default)")
    p.add_argument("--max-frames", type=int, default=768, help="most video frames sampled")
    p.add_argument("--min-pixels", type=int, default=None, help="fewest pixels per frame / image (default: the "
                                                                "checkpoint's preprocessor config)")
    p.add_argument("--max-pixels", type=int, default=None, help="most pixels per frame / image (default: the "
                                                                "checkpoint's preprocessor config)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="video decoder")
    p.add_argument("--out", required=True, help="output .pt file")
    add_json(p, "the summary (out, tensor shapes, meta)")
    return p


def preprocess_main(argv: Sequence[str] | None = None) -> int:
    from megatron_ral.checkpoint.locate import processor_dir

    args = preprocess_parser().parse_args(argv)
    model_dir = processor_dir(args.hf, "--hf")
    if not args.fps > 0:
        raise UsageError(f"--fps {args.fps}: must be > 0")
    check.at_least(args.max_frames, 2, "--max-frames")
    for flag, value in (("--min-pixels", args.min_pixels), ("--max-pixels", args.max_pixels)):
        if value is not None:
            check.at_least(value, 1, flag)
    if args.min_pixels is not None and args.max_pixels is not None and args.min_pixels > args.max_pixels:
        raise UsageError(f"--min-pixels {args.min_pixels}: exceeds --max-pixels {args.max_pixels}")
    check.media_files(args.image, args.video)
    check.output_file(args.out, "--out")

    import logging

    import torch

    from megatron_ral.data.single import preprocess_single

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = preprocess_single(
        str(model_dir), video=args.video, image=args.image, prompt=args.prompt, fps=args.fps,
        max_frames=args.max_frames, min_pixels=args.min_pixels, max_pixels=args.max_pixels, backend=args.backend)
    check.write_file_atomically(args.out, "--out", lambda tmp: torch.save(out, tmp))
    summary = {"out": args.out, **{k: list(v.shape) for k, v in out.items() if isinstance(v, torch.Tensor)},
               "meta": out["meta"]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in summary.items() if k != "out"))
    return 0


def preprocess_cli() -> NoReturn:
    run_main(prog_name("preprocess.py"), preprocess_main)
