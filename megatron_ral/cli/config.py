"""Command line of the configuration checker: ``python -m megatron_ral.config`` / ``megatron-ral-config``.

    python -m megatron_ral.config --config FILE [section.key=value ...] [--world-size N] [--json]

Resolves the YAML file and the overrides into the typed configuration, checks every rule the trainer
checks (on this machine: sequence parallelism and the Transformer Engine spec need CUDA), and prints
the result as YAML (or JSON), or one line naming the bad key (exit code 2).
"""

from __future__ import annotations

import json
import sys
from typing import NoReturn, Sequence

from megatron_ral.cli.arguments import ToolParser, add_json
from megatron_ral.cli.entry import prog_name, run_main

PROG = "python -m megatron_ral.config"


def parser() -> ToolParser:
    p = ToolParser(prog=prog_name(PROG), description=(
        "Resolve a configuration (YAML file + section.key=value overrides), validate it, print it.\n"
        "megatron_ral/config/schema.py documents every key."))
    p.add_argument("--config", default=None, help="YAML file (defaults for everything it does not set)")
    p.add_argument("--world-size", type=int, default=None, help="also check the parallel layout against this "
                                                                "many processes")
    add_json(p, "the resolved configuration")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides, applied in order")
    return p


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    from megatron_ral.config import load_config, to_dict, validate
    from megatron_ral.errors import UsageError

    args = parser().parse_args(argv)
    if args.world_size is not None and args.world_size < 1:
        raise UsageError(f"--world-size {args.world_size}: must be >= 1")
    cfg = load_config(args.config, args.overrides)
    # Only the CUDA-only features need to know about CUDA (and only they pay for importing torch).
    needs_cuda = cfg.parallel.sequence_parallel or cfg.model.layer_spec == "te"
    validate(cfg, world_size=args.world_size, cuda_available=_cuda_available() if needs_cuda else None)
    if args.json:
        print(json.dumps(to_dict(cfg)))
    else:
        yaml.safe_dump(to_dict(cfg), sys.stdout, sort_keys=False)
    return 0


def cli() -> NoReturn:
    run_main(prog_name(PROG), main)
