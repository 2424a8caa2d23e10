"""Command line of tools/dump_attention.py (``megatron-ral-dump-attention``): the last-layer attention
policy rows of a response continuation (RAL's p_theta), computed by ``attention.dump``. It lives beside
generation's command line, whose model flags and checks it shares (and whose package imports no torch).

    torchrun --nproc-per-node N tools/dump_attention.py --ckpt CKPT --tp T --pp P [--cp C] --prompt TEXT
        [--image FILE | --video FILE] --response TEXT --out FILE.pt [--dtype auto|fp32|bf16] [--json]

Also runs as a plain single process (N = T x P x C = 1). ``--cp C`` splits the sequence over C context-parallel
ranks (the training path for long videos: each rank holds a share of the tokens, the rows of the response
tokens it holds are computed against the whole key sequence and put back together); the file is the same. The prompt is one user turn (media first, then
TEXT) rendered with the checkpoint's chat template and the generation prompt, as tools/preprocess.py
builds it; the response is tokenised without special tokens and appended. Rank 0 saves
{"rows": float32 [R, T], "prompt_length": P, "input_ids": int64 [T]}: row r is the head-mean attention
of the response token at 0-based position P + r over positions 0 .. P + r - 1, renormalised (zero from
P + r on). The media budgets (fps, frames, pixels) are the ones the checkpoint was trained with (the
configuration it keeps; ``--config`` replaces it); without one, the checkpoint's preprocessor configs.
"""

from __future__ import annotations

import json
import sys
from typing import NoReturn, Sequence

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_json
from megatron_ral.cli.entry import prog_name, run_main
from megatron_ral.errors import UsageError
from megatron_ral.cli.model_flags import add_model_flags, check_model_flags, run_on_platform, torch_dtype


def parser() -> ToolParser:
    p = ToolParser(prog=prog_name("dump_attention.py"),
                   description="Dump the last-layer attention-policy rows of a response continuation (RAL's "
                               "p_theta).\nAlso runs as a plain single process when TP x PP x CP = 1.",
                   epilog="Run under torchrun for TP x PP x CP > 1.")
    add_model_flags(p, dtype_default="auto", context_parallel=True)  # auto: bf16 on GPU (fp32 would run TE's unfused, quadratic-memory attention), fp32 on CPU
    p.add_argument("--response", required=True, help="response text appended after the generation prompt")
    p.add_argument("--out", required=True, help="output .pt file (written by rank 0; rows are always float32)")
    p.add_argument("--config", default=None, help="training config whose data settings to use "
                                                  "(default: the one the checkpoint keeps)")
    add_json(p, "the summary (out, rows shape, prompt_length)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.response.strip():
        raise UsageError("--response is empty")
    check.output_file(args.out, "--out")
    flags = check_model_flags(args)

    import torch

    from megatron_ral.attention.dump import dump_attention
    from megatron_ral.inference.loading import load_model

    from megatron_ral.inference.prompts import build_prompt

    from megatron_ral.cli.run_settings import load_settings, media_budget, settings_report

    settings = load_settings(args.ckpt, args.config, dist_dir=flags.model_dir)
    kind = "image" if args.image is not None else "video" if args.video is not None else None
    budget = media_budget(settings.cfg.data, kind) if settings.base != "default" and kind else None
    prompt, processor = build_prompt(flags.model_dir, args.prompt, image=args.image, video=args.video, budget=budget)
    response_ids = processor.tokenize(args.response)
    if not response_ids:
        raise UsageError("--response tokenises to no tokens")

    def work(info):
        model = load_model(args.ckpt, flags.parallel(), dtype=torch_dtype(args.dtype))
        out = dump_attention(model, prompt, response_ids)
        if info.rank == 0:
            check.write_file_atomically(args.out, "--out", lambda tmp: torch.save(out, tmp))
            summary = {"out": args.out, "rows": list(out["rows"].shape), "prompt_length": out["prompt_length"],
                       "settings": settings_report(settings)}
            if args.json:
                print(json.dumps(summary))
            else:
                print(f"wrote {args.out}: rows {summary['rows']}, prompt_length {summary['prompt_length']}")
            sys.stdout.flush()

    run_on_platform(flags.parallel(), 0, work)
    return 0


def cli() -> NoReturn:
    run_main(prog_name("dump_attention.py"), main)
