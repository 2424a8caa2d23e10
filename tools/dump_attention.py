#!/usr/bin/env python
"""Dump the last-layer attention policy rows of a response continuation (RAL's p_theta).

    torchrun --nproc-per-node N tools/dump_attention.py --ckpt CKPT --tp T --pp P --prompt TEXT
        [--image FILE | --video FILE] --response TEXT --out FILE.pt [--dtype auto|fp32|bf16]

Also runs as a plain single process (python tools/dump_attention.py ...; N = T x P). The prompt is one
user turn (media first, then TEXT) rendered with the checkpoint's chat template and the generation
prompt, as tools/preprocess.py builds it; the response is tokenised without special tokens and
appended. Rank 0 saves {"rows": float32 [R, T], "prompt_length": P, "input_ids": int64 [T]}: row r is
the head-mean attention of the response token at 0-based position P + r over positions 0 .. P + r - 1,
renormalised (zero from P + r on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DTYPES = ("auto", "fp32", "bf16")


class ToolError(Exception):
    """A bad input, reported as one line."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Dump the last-layer attention policy rows of a response.",
                                epilog="Run under torchrun for TP/PP > 1.")
    p.add_argument("--ckpt", required=True, help="megatron dist checkpoint (tools/convert_hf_to_megatron.py output)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--pp-split", default=None,
                   help="layers per pipeline stage, comma-separated (default: even; balanced if uneven)")
    p.add_argument("--prompt", required=True, help="user text (after the image / video)")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--image", help="image file")
    media.add_argument("--video", help="video file")
    p.add_argument("--response", required=True, help="response text appended after the generation prompt")
    p.add_argument("--out", required=True, help="output .pt file (written by rank 0)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="model dtype: auto = the model's (bf16 on GPU, where fp32 would run Transformer Engine's "
                        "unfused attention with quadratic memory; fp32 on CPU). Rows are always float32")
    p.add_argument("--json", action="store_true", help="print a JSON summary on rank 0")
    return p


def check_args(args) -> None:
    if args.tp < 1 or args.pp < 1:
        raise ToolError(f"--tp and --pp must be >= 1, got --tp {args.tp} --pp {args.pp}")
    from megatron_ral.platform.launch_env import resolve_launch_env

    world = resolve_launch_env().world_size
    if world != args.tp * args.pp:
        raise ToolError(f"{world} process(es) but --tp {args.tp} x --pp {args.pp} = {args.tp * args.pp}; "
                        f"run torchrun --nproc-per-node {args.tp * args.pp}")
    if not os.path.isdir(args.ckpt):
        raise ToolError(f"--ckpt {args.ckpt}: no such directory")
    for path, flag in ((args.image, "--image"), (args.video, "--video")):
        if path is not None and not os.path.isfile(path):
            raise ToolError(f"{flag} {path}: no such file")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise ToolError(f"--out {args.out}: directory {out_dir} does not exist")
    if not args.response.strip():
        raise ToolError("--response is empty")
    if args.pp_split is not None:
        try:
            args.pp_split = [int(x) for x in args.pp_split.split(",")]
        except ValueError:
            raise ToolError(f"--pp-split {args.pp_split!r}: expected comma-separated integers") from None
        if len(args.pp_split) != args.pp or min(args.pp_split) < 1:
            raise ToolError(f"--pp-split {args.pp_split}: need one positive layer count per pipeline stage ({args.pp})")


def run(args) -> int:
    import torch

    from megatron_ral.attention.dump import dump_attention
    from megatron_ral.checkpoint.safetensors_io import CheckpointFileError
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.data.errors import DataError
    from megatron_ral.inference.cli import build_prompt
    from megatron_ral.inference.loading import hf_files_dir, load_model
    from megatron_ral.models.qwen25vl.provider import LMArchitecture, balanced_layer_split, load_hf_config
    from megatron_ral.platform import destroy, initialize

    try:
        model_dir = hf_files_dir(args.ckpt)
    except (FileNotFoundError, CheckpointFileError) as e:
        raise ToolError(str(e)) from None
    num_layers = LMArchitecture.from_hf(load_hf_config(str(model_dir))).num_layers
    split = args.pp_split
    try:
        if split is None:
            split = balanced_layer_split(num_layers, args.pp)
        elif sum(split) != num_layers:
            raise ValueError(f"--pp-split {split} sums to {sum(split)}, the model has {num_layers} layers")
    except ValueError as e:
        raise ToolError(str(e)) from None
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              pipeline_layer_split=split)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]  # None: provider default
    try:
        prompt, processor = build_prompt(model_dir, args.prompt, image=args.image, video=args.video)
    except (DataError, ValueError, OSError) as e:
        raise ToolError(f"cannot build the prompt: {e}") from None
    response_ids = processor.tokenize(args.response)
    if not response_ids:
        raise ToolError("--response tokenises to no tokens")
    info = initialize(parallel, seed=0)
    try:
        try:
            model = load_model(args.ckpt, parallel, dtype=dtype)
        except ValueError as e:  # e.g. TP not dividing the heads
            raise ToolError(str(e)) from None
        out = dump_attention(model, prompt, response_ids)
        if info.rank == 0:
            torch.save(out, args.out)
            if args.json:
                print(json.dumps({"out": args.out, "rows": list(out["rows"].shape),
                                  "prompt_length": out["prompt_length"]}))
            else:
                print(f"wrote {args.out}: rows {list(out['rows'].shape)}, prompt_length {out['prompt_length']}")
            sys.stdout.flush()
    finally:
        destroy()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_args(args)
        return run(args)
    except ToolError as e:
        print(f"dump_attention.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
