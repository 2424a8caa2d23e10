"""``megatron-ral-convert-megatron-to-hf --ckpt DIR --out DIR`` (tools/convert_megatron_to_hf.py).

Every flag is checked before torch is imported; the output is written all-or-nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn, Sequence

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_json, add_overwrite
from megatron_ral.cli.entry import prog_name, run_main
from megatron_ral.errors import UsageError
from megatron_ral.cli.convert_hf_to_megatron import print_result

DEFAULT_MAX_CHUNK_MB = 256
DEFAULT_MAX_SHARD_GB = 5.0


def parser() -> ToolParser:
    p = ToolParser(prog=prog_name("convert_megatron_to_hf.py"), description=(
        "Convert a Megatron-Core distributed checkpoint (torch_dist, saved at any TP/PP) into a Hugging Face\n"
        "Qwen2.5-VL directory: sharded safetensors with the released key naming, index, config, tokenizer and\n"
        "processor files. --ckpt may be the checkpoint directory itself or a run directory with iter_*\n"
        "checkpoints (the latest is taken)."))
    p.add_argument("--ckpt", required=True, help="Megatron-Core torch_dist checkpoint or training run directory")
    p.add_argument("--out", required=True, help="output Hugging Face directory (created; absent or empty)")
    p.add_argument("--hf-config", default=None,
                   help="Hugging Face directory with config/tokenizer files, when the checkpoint does not carry them")
    add_overwrite(p)
    p.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_GB, help="largest safetensors shard")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_json(p, "the summary (out, tensors, bytes, seconds)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_ral.checkpoint.locate import find_hf_config_dir, hf_checkpoint, megatron_checkpoint
    from megatron_ral.models.qwen25vl.arch import arch_from_config, load_hf_config

    args = parser().parse_args(argv)
    dist_dir = megatron_checkpoint(args.ckpt, "--ckpt")
    if args.hf_config is not None:
        cfg_dir = hf_checkpoint(args.hf_config, "--hf-config", weights=False)
    else:
        cfg_dir = find_hf_config_dir(dist_dir, args.ckpt)
    arch_from_config(load_hf_config(cfg_dir), str(cfg_dir / "config.json"))
    if not args.max_shard_gb > 0:
        raise UsageError(f"--max-shard-gb {args.max_shard_gb}: must be > 0")
    check.output_dir(args.out, "--out", args.overwrite)
    check.not_inside(args.out, Path(args.ckpt), "--ckpt")

    from megatron_ral.checkpoint.convert import megatron_to_hf

    result = megatron_to_hf(args.ckpt, args.out, hf_config=args.hf_config, overwrite=args.overwrite,
                            max_shard_bytes=int(args.max_shard_gb * 2**30), progress=not args.quiet)
    print_result(result, args.json)
    return 0


def cli() -> NoReturn:
    run_main(prog_name("convert_megatron_to_hf.py"), main)
