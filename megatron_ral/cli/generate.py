"""``megatron-ral-generate`` (tools/generate.py): generation from a Megatron checkpoint.

    torchrun --nproc-per-node N tools/generate.py --ckpt CKPT --tp T --pp P --prompt TEXT
        [--image FILE | --video FILE] [--max-new-tokens K] [--greedy | --temperature X --top-p Y --top-k K]
        [--seed S] [--dtype auto|fp32|bf16] [--pp-split A,B] [--config RUN.yaml] [--json]

The media budgets (fps, frames, pixels) and the sampling settings default to the ones the checkpoint was
trained with (the configuration it keeps; ``--config`` replaces it; flags win); a checkpoint without one
uses its preprocessor configs and the defaults below. ``--json`` states the settings and their sources.

Every flag is checked before torch is imported; :func:`~megatron_ral.inference.prompts.build_prompt` then decodes
the media and renders the chat prompt before the model is loaded, so every input error costs a fraction of a
second, not a model load.
"""

from __future__ import annotations

import json
import sys
from typing import NoReturn, Sequence

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_json
from megatron_ral.cli.entry import prog_name, run_main
from megatron_ral.cli.model_flags import add_model_flags, check_model_flags, run_on_platform, torch_dtype

DEFAULT_MAX_NEW_TOKENS = 128



def parser() -> ToolParser:
    p = ToolParser(
        prog=prog_name("generate.py"),
        description="Generate a response with the Megatron Qwen2.5-VL model from a distributed checkpoint "
                    "(KV cache, TP/PP).\nAlso runs as a plain single process when TP x PP = 1.",
        epilog="Run under torchrun for TP x PP > 1: torchrun --nproc-per-node N tools/generate.py --tp T --pp P ...")
    add_model_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"response length cap (default: the checkpoint's generation.max_new_tokens, else "
                        f"{DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--config", default=None, help="training config whose data / generation settings to use "
                                                  "(default: the one the checkpoint keeps)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (excludes the sampling flags)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature, >= 0 (default 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_json(p, "the result (token_ids, text, finish_reason, prompt_length)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check.sampling(greedy=args.greedy, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   max_new_tokens=1 if args.max_new_tokens is None else args.max_new_tokens)
    flags = check_model_flags(args)

    from megatron_ral.cli.run_settings import load_settings, media_budget, settings_report
    from megatron_ral.inference.generate import generate
    from megatron_ral.inference.loading import load_model, stop_token_ids
    from megatron_ral.inference.prompts import build_prompt

    settings = load_settings(args.ckpt, args.config, dist_dir=flags.model_dir)
    kept = settings.base != "default"
    if not kept:  # this tool's own defaults
        settings.set("generation.max_new_tokens", DEFAULT_MAX_NEW_TOKENS, "default")
    for flag, key in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                      ("max_new_tokens", "max_new_tokens")):
        if getattr(args, flag) is not None:
            settings.set(f"generation.{key}", getattr(args, flag))
    config = settings.cfg.generation
    kind = "image" if args.image is not None else "video" if args.video is not None else None
    budget = media_budget(settings.cfg.data, kind) if kept and kind else None
    prompt, processor = build_prompt(flags.model_dir, args.prompt, image=args.image, video=args.video, budget=budget)

    def work(info):
        model = load_model(args.ckpt, flags.parallel(), dtype=torch_dtype(args.dtype))
        (response,), = generate(model, [prompt], config, greedy=args.greedy, seed=args.seed,
                                stop_token_ids=stop_token_ids(flags.model_dir, processor.tokenizer))
        if info.rank == 0:
            ids = response.token_ids.tolist()
            text = processor.decode(ids, skip_special_tokens=True)
            if args.json:
                print(json.dumps({"token_ids": ids, "text": text, "finish_reason": response.finish_reason,
                                  "prompt_length": response.prompt_length, "settings": settings_report(settings)}))
            else:
                print(text)
            sys.stdout.flush()

    run_on_platform(flags.parallel(), args.seed, work)
    return 0


def cli() -> NoReturn:
    run_main(prog_name("generate.py"), main)
