"""``megatron-ral-make-tiny-checkpoint --out DIR [--preset tiny|small]`` (tools/make_tiny_checkpoint.py).
"""

from __future__ import annotations

import json
from typing import NoReturn, Sequence

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_json, add_overwrite
from megatron_ral.tiny.config import PRESETS
from megatron_ral.cli.entry import prog_name, run_main


def parser() -> ToolParser:
    p = ToolParser(prog=prog_name("make_tiny_checkpoint.py"), description=(
        "Write a randomly initialised Qwen2.5-VL checkpoint in Hugging Face format, with a BPE tokenizer\n"
        "carrying the Qwen special tokens, the chat template and the image/video processor configs."))
    p.add_argument("--out", required=True, help="output directory (created; absent or empty)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="tiny: 3 layers, hidden 64 (tests); small: 4 layers, hidden 256 (benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="weights seed (same seed and config, same bytes)")
    p.add_argument("--config-json", default=None,
                   help="JSON file with Hugging Face config keys merged into the preset: nested text_config / "
                        "vision_config or the released flat layout; rope_scaling / rope_parameters for the "
                        "M-RoPE sections; unknown keys are refused")
    add_overwrite(p)
    add_json(p, "the summary (out, preset, seed)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    args = parser().parse_args(argv)
    check.output_dir(args.out, "--out", args.overwrite)
    check.at_least(args.seed, 0, "--seed")
    overrides = None
    source = f"--config-json {args.config_json}"
    if args.config_json is not None:
        from megatron_ral.tiny.config import normalize_overrides, resolve_spec

        overrides, dropped = normalize_overrides(check.json_file(args.config_json, "--config-json"), source)
        resolve_spec(args.preset, overrides, source)  # every rule, before torch is imported
        if dropped:
            print(f"note: {', '.join(dropped)} from --config-json not used: the tiny checkpoint sets them itself "
                  f"(special-token ids come from its tokenizer)", file=sys.stderr)

    from megatron_ral.checkpoint.output_dir import atomic_output_dir
    from megatron_ral.tiny.checkpoint import make_tiny_checkpoint

    with atomic_output_dir(args.out, args.overwrite) as tmp:
        make_tiny_checkpoint(tmp, preset=args.preset, seed=args.seed, config_overrides=overrides, source=source)
    summary = {"out": args.out, "preset": args.preset, "seed": args.seed}
    print(json.dumps(summary) if args.json else f"wrote {args.out} (preset {args.preset}, seed {args.seed})")
    return 0


def cli() -> NoReturn:
    run_main(prog_name("make_tiny_checkpoint.py"), main)
