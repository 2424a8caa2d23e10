"""``megatron-ral-convert-hf-to-megatron --hf DIR --out DIR`` (tools/convert_hf_to_megatron.py).

Every flag is checked before torch is imported; the output is written all-or-nothing.
"""

from __future__ import annotations

import json
from typing import NoReturn, Sequence

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_json, add_overwrite
from megatron_ral.cli.entry import prog_name, run_main

DEFAULT_MAX_CHUNK_MB = 256
DEFAULT_MAX_SHARD_GB = 5.0


def print_result(result, as_json: bool) -> None:
    """The one line (or JSON object) a conversion prints."""
    summary = {"out": str(result.out_dir), "tensors": result.num_tensors, "bytes": result.total_bytes,
               "seconds": round(result.seconds, 3)}
    if as_json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['out']}: {summary['tensors']} tensors, {summary['bytes'] / 1e9:.3f} GB "
              f"in {summary['seconds']} s")


def parser() -> ToolParser:
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


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_ral.checkpoint.locate import hf_checkpoint
    from megatron_ral.models.qwen25vl.arch import arch_from_config, load_hf_config
    from megatron_ral.checkpoint.safetensors_header import check_weight_files

    args = parser().parse_args(argv)
    hf = hf_checkpoint(args.hf, "--hf")
    arch_from_config(load_hf_config(hf), str(hf / "config.json"))
    check_weight_files(hf)
    check.at_least(args.max_chunk_mb, 1, "--max-chunk-mb")
    check.output_dir(args.out, "--out", args.overwrite)
    check.not_inside(args.out, hf, "--hf")

    from megatron_ral.checkpoint.convert import hf_to_megatron

    result = hf_to_megatron(hf, args.out, overwrite=args.overwrite, max_chunk_bytes=args.max_chunk_mb * 2**20,
                            progress=not args.quiet)
    print_result(result, args.json)
    return 0


def cli() -> NoReturn:
    run_main(prog_name("convert_hf_to_megatron.py"), main)
