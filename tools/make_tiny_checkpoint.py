#!/usr/bin/env python
"""Write a randomly initialised Qwen2.5-VL checkpoint (HF format, with tokenizer and processor)."""

import argparse
import json
import sys

from megatron_ral.checkpoint.tiny import PRESETS, make_tiny_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config-json", default=None,
                        help="JSON file merged into the config: text_config / vision_config dicts, other keys top level")
    args = parser.parse_args(argv)
    overrides = None
    if args.config_json:
        with open(args.config_json) as f:
            overrides = json.load(f)
        if not isinstance(overrides, dict):
            parser.error(f"{args.config_json}: expected a JSON object")
    path = make_tiny_checkpoint(args.out, preset=args.preset, seed=args.seed, config_overrides=overrides)
    print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
