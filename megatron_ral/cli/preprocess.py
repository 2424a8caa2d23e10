"""``megatron-ral-preprocess --hf DIR (--video F | --image F) --out FILE.pt`` (tools/preprocess.py).

Every flag, path and media file is checked before torch is imported.
"""

from __future__ import annotations

import json
from typing import NoReturn, Sequence

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_json, add_media
from megatron_ral.cli.entry import prog_name, run_main
from megatron_ral.errors import UsageError

BACKENDS = ("auto", "dali", "pyav")


def parser() -> ToolParser:
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


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_ral.checkpoint.locate import processor_dir

    args = parser().parse_args(argv)
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


def cli() -> NoReturn:
    run_main(prog_name("preprocess.py"), main)
