"""``python -m megatron_ral.config --config FILE [key=value ...]``: resolve, validate, print as YAML."""

from __future__ import annotations

import argparse
import sys

import yaml

from megatron_ral.config import ConfigError, load_config, to_dict, validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_ral.config", description=__doc__)
    parser.add_argument("--config", default=None, help="YAML file (defaults for everything not given)")
    parser.add_argument("--world-size", type=int, default=None, help="also check the layout against this")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = validate(load_config(args.config, args.overrides), world_size=args.world_size)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    yaml.safe_dump(to_dict(cfg), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
