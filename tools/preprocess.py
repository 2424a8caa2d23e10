#!/usr/bin/env python
"""Turn one video or image plus a prompt into Qwen2.5-VL model inputs saved with torch.save.

    python tools/preprocess.py --model DIR (--video FILE | --image FILE) [--prompt TEXT] [--fps F]
        [--max-frames N] [--min-pixels P] [--max-pixels P] [--backend auto|dali|pyav] --out FILE.pt

The saved dict holds input_ids, attention_mask, pixel_values (image) or pixel_values_videos (video),
image_grid_thw / video_grid_thw, second_per_grid_ts (video), position_ids (3-row M-RoPE ids),
frame_indices (video) and meta (codec, backend, sizes).
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from megatron_ral.data.single import preprocess_single


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (tokenizer, chat template, preprocessor config)")
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--video")
    media.add_argument("--image")
    p.add_argument("--prompt", default=None, help="user text after the media (default: 'Describe this video/image.')")
    p.add_argument("--fps", type=float, default=2.0, help="video sampling rate (qwen-vl-utils default 2.0)")
    p.add_argument("--max-frames", type=int, default=768)
    p.add_argument("--min-pixels", type=int, default=None, help="default: the checkpoint's preprocessor config")
    p.add_argument("--max-pixels", type=int, default=None, help="default: the checkpoint's preprocessor config")
    p.add_argument("--backend", choices=["auto", "dali", "pyav"], default="auto")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = preprocess_single(
        args.model, video=args.video, image=args.image, prompt=args.prompt, fps=args.fps, max_frames=args.max_frames,
        min_pixels=args.min_pixels, max_pixels=args.max_pixels, backend=args.backend,
    )
    torch.save(out, args.out)
    summary = {k: list(v.shape) for k, v in out.items() if isinstance(v, torch.Tensor)}
    summary["meta"] = out["meta"]
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
