"""Command lines of the checkpoint tools (tools/*.py and the megatron-ral-* console scripts call these).

    megatron-ral-convert-hf-to-megatron   --hf DIR --out DIR      (tools/convert_hf_to_megatron.py)
    megatron-ral-convert-megatron-to-hf   --ckpt DIR --out DIR    (tools/convert_megatron_to_hf.py)
    megatron-ral-make-tiny-checkpoint     --out DIR               (tools/make_tiny_checkpoint.py)

Every flag is checked before torch is imported; outputs are written all-or-nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn, Sequence

from megatron_ral import input_checks as check
from megatron_ral.arguments import ToolParser, add_json, add_overwrite
from megatron_ral.checkpoint.tiny_config import PRESETS
from megatron_ral.entry import prog_name, run_main
from megatron_ral.errors import UsageError

DEFAULT_MAX_CHUNK_MB = 256
DEFAULT_MAX_SHARD_GB = 5.0


def _not_inside(out: str, source: Path, flag: str) -> None:
    """--out must neither be the input, nor lie inside it, nor contain it (--overwrite would delete it)."""
    o, s = Path(out).resolve(), source.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise UsageError(f"--out {out}: must not be {flag}, inside it or around it")


def _print_result(result, as_json: bool) -> None:
    summary = {"out": str(result.out_dir), "tensors": result.num_tensors, "bytes": result.total_bytes,
               "seconds": round(result.seconds, 3)}
    if as_json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['out']}: {summary['tensors']} tensors, {summary['bytes'] / 1e9:.3f} GB "
              f"in {summary['seconds']} s")


# --- convert_hf_to_megatron -------------------------------------------------------------------------

def hf_to_megatron_parser() -> ToolParser:
    p = ToolParser(prog=prog_name("convert_hf_to_megatron.py"), description=(
        "Convert a Hugging Face Qwen2.5-VL checkpoint into a Megatron-Core distributed checkpoint (torch_dist).\n\n"
        "The result loads at any tensor/pipeline parallel layout (megatron-core reshards on load) and carries\n"
        "the HF config, tokenizer and processor files, so it converts back without extra arguments."))
    p.add_argument("--hf", required=True, help="Hugging Face Qwen2.5-VL directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory (created; absent or empty)")
    add_overwrite(p)
    p.add_argument("--max-chunk-mb", type=int, default=DEFAULT_MAX_CHUNK_MB,
                   help="store tensors larger than this in row blocks (bounds memory in both directions)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_json(p, "the summary (out, tensors, bytes, seconds)")
    return p


def hf_to_megatron_main(argv: Sequence[str] | None = None) -> int:
    from megatron_ral.checkpoint.locate import hf_checkpoint
    from megatron_ral.checkpoint.qwen25vl_arch import arch_from_config, load_hf_config
    from megatron_ral.checkpoint.safetensors_header import check_weight_files

    args = hf_to_megatron_parser().parse_args(argv)
    hf = hf_checkpoint(args.hf, "--hf")
    arch_from_config(load_hf_config(hf), str(hf / "config.json"))
    check_weight_files(hf)
    check.at_least(args.max_chunk_mb, 1, "--max-chunk-mb")
    check.output_dir(args.out, "--out", args.overwrite)
    _not_inside(args.out, hf, "--hf")

    from megatron_ral.checkpoint.convert import hf_to_megatron

    result = hf_to_megatron(hf, args.out, overwrite=args.overwrite, max_chunk_bytes=args.max_chunk_mb * 2**20,
                            progress=not args.quiet)
    _print_result(result, args.json)
    return 0


def hf_to_megatron_cli() -> NoReturn:
    run_main(prog_name("convert_hf_to_megatron.py"), hf_to_megatron_main)


# --- convert_megatron_to_hf -------------------------------------------------------------------------

def megatron_to_hf_parser() -> ToolParser:
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


def megatron_to_hf_main(argv: Sequence[str] | None = None) -> int:
    from megatron_ral.checkpoint.locate import find_hf_config_dir, hf_checkpoint, megatron_checkpoint
    from megatron_ral.checkpoint.qwen25vl_arch import arch_from_config, load_hf_config

    args = megatron_to_hf_parser().parse_args(argv)
    dist_dir = megatron_checkpoint(args.ckpt, "--ckpt")
    if args.hf_config is not None:
        cfg_dir = hf_checkpoint(args.hf_config, "--hf-config", weights=False)
    else:
        cfg_dir = find_hf_config_dir(dist_dir, args.ckpt)
    arch_from_config(load_hf_config(cfg_dir), str(cfg_dir / "config.json"))
    if not args.max_shard_gb > 0:
        raise UsageError(f"--max-shard-gb {args.max_shard_gb}: must be > 0")
    check.output_dir(args.out, "--out", args.overwrite)
    _not_inside(args.out, Path(args.ckpt), "--ckpt")

    from megatron_ral.checkpoint.convert import megatron_to_hf

    result = megatron_to_hf(args.ckpt, args.out, hf_config=args.hf_config, overwrite=args.overwrite,
                            max_shard_bytes=int(args.max_shard_gb * 2**30), progress=not args.quiet)
    _print_result(result, args.json)
    return 0


def megatron_to_hf_cli() -> NoReturn:
    run_main(prog_name("convert_megatron_to_hf.py"), megatron_to_hf_main)


# --- make_tiny_checkpoint ---------------------------------------------------------------------------

def make_tiny_parser() -> ToolParser:
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


def make_tiny_main(argv: Sequence[str] | None = None) -> int:
    import sys

    args = make_tiny_parser().parse_args(argv)
    check.output_dir(args.out, "--out", args.overwrite)
    check.at_least(args.seed, 0, "--seed")
    overrides = None
    source = f"--config-json {args.config_json}"
    if args.config_json is not None:
        from megatron_ral.checkpoint.tiny_config import normalize_overrides, resolve_spec

        overrides, dropped = normalize_overrides(check.json_file(args.config_json, "--config-json"), source)
        resolve_spec(args.preset, overrides, source)  # every rule, before torch is imported
        if dropped:
            print(f"note: {', '.join(dropped)} from --config-json not used: the tiny checkpoint sets them itself "
                  f"(special-token ids come from its tokenizer)", file=sys.stderr)

    from megatron_ral.checkpoint.output_dir import atomic_output_dir
    from megatron_ral.checkpoint.tiny import make_tiny_checkpoint

    with atomic_output_dir(args.out, args.overwrite) as tmp:
        make_tiny_checkpoint(tmp, preset=args.preset, seed=args.seed, config_overrides=overrides, source=source)
    summary = {"out": args.out, "preset": args.preset, "seed": args.seed}
    print(json.dumps(summary) if args.json else f"wrote {args.out} (preset {args.preset}, seed {args.seed})")
    return 0


def make_tiny_cli() -> NoReturn:
    run_main(prog_name("make_tiny_checkpoint.py"), make_tiny_main)
