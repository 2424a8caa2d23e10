#!/usr/bin/env python
"""Convert a Megatron-Core distributed checkpoint (torch_dist, saved at any TP/PP) into a Hugging Face
Qwen2.5-VL directory: sharded safetensors with the released key naming, index, config, tokenizer and
processor files. --ckpt may be the checkpoint directory itself or a run directory with iter_* checkpoints
(the latest is taken).
"""

import argparse
import sys

from megatron_ral.checkpoint.convert import DEFAULT_MAX_SHARD_BYTES, megatron_to_hf
from megatron_ral.checkpoint.tool_errors import run_conversion


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", required=True, help="megatron torch_dist checkpoint directory")
    parser.add_argument("--out", required=True, help="output HF directory (created)")
    parser.add_argument("--hf-config", default=None,
                        help="HF directory with config/tokenizer files, when the checkpoint does not carry them")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**30)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    return run_conversion(lambda: megatron_to_hf(args.ckpt, args.out, hf_config=args.hf_config, overwrite=args.overwrite,
                                                  max_shard_bytes=int(args.max_shard_gb * 2**30), progress=not args.quiet))


if __name__ == "__main__":
    sys.exit(main())
