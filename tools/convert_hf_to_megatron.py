#!/usr/bin/env python
"""Convert a Hugging Face Qwen2.5-VL checkpoint into a Megatron-Core distributed checkpoint (torch_dist).

The result loads at any tensor/pipeline parallel layout (megatron-core reshards on load) and carries the
HF config, tokenizer and processor files, so it can be converted back without extra arguments.
"""

import argparse
import sys

from megatron_ral.checkpoint.convert import DEFAULT_MAX_CHUNK_BYTES, hf_to_megatron
from megatron_ral.checkpoint.tool_errors import run_conversion


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hf", required=True, help="HF Qwen2.5-VL directory (config.json + *.safetensors)")
    parser.add_argument("--out", required=True, help="output checkpoint directory (created)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--max-chunk-mb", type=int, default=DEFAULT_MAX_CHUNK_BYTES // 2**20,
                        help="store tensors larger than this in row blocks (bounds memory in both directions)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    return run_conversion(lambda: hf_to_megatron(args.hf, args.out, overwrite=args.overwrite,
                                                  max_chunk_bytes=args.max_chunk_mb * 2**20, progress=not args.quiet))


if __name__ == "__main__":
    sys.exit(main())
