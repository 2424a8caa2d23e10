"""``python -m megatron_ral.train --config FILE [section.key=value ...]`` (``megatron-ral-train``): the
trainer's command line.

Every input (config keys and values, the layout against the process count, checkpoint kinds, record files,
the run directory, a custom reward function) is checked here before torch is imported: a mistake is one line
and exit code 2. Then :func:`megatron_ral.train.train` runs the loop.
"""

from __future__ import annotations

from megatron_ral.cli.arguments import ToolParser
from megatron_ral.cli.entry import run_main
from megatron_ral.config import Config, load_config, validate
from megatron_ral.errors import UserError

DESCRIPTION = "SFT, GRPO, RAL and RAL-zero on the Megatron-Core Qwen2.5-VL model (python -m megatron_ral.train)."


def parse_args(argv):
    p = ToolParser(prog="megatron-ral-train", description=DESCRIPTION)
    p.add_argument("--config", default=None, help="YAML run configuration (defaults for everything not given)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. algorithm.lambda_attn=5")
    return p.parse_args(argv)


def _record_file(path: str, key: str) -> None:
    """A Video-R1 record file: present, not empty, a JSON array or JSON lines (first non-blank byte)."""
    from megatron_ral.cli import input_checks as check

    p = check.input_file(path, key)
    with open(p, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        raise UserError(f"{key} {path}: empty file (expected a JSON array or JSON lines of Video-R1 records)")
    if head[:1] not in (b"[", b"{"):
        raise UserError(f"{key} {path}: not a JSON array or JSON lines file of Video-R1 records")


def preflight(cfg: Config) -> None:
    """Inputs and outputs checked before torch is imported (one line naming the key)."""
    from megatron_ral.cli import input_checks as check
    from megatron_ral.checkpoint.locate import hf_checkpoint, megatron_checkpoint, processor_dir
    from megatron_ral.rl.rewards import load_reward_function

    if not cfg.model.hf_path and not cfg.model.load:
        raise UserError("model.hf_path / model.load: give the model (an HF directory or a Megatron checkpoint)")
    if cfg.model.load:
        megatron_checkpoint(cfg.model.load, "model.load")
    if cfg.model.hf_path:
        if cfg.model.load:
            processor_dir(cfg.model.hf_path, "model.hf_path")
        else:
            hf_checkpoint(cfg.model.hf_path, "model.hf_path")
    if not cfg.data.train_files:
        raise UserError("data.train_files: no training records given")
    for key in ("train_files", "eval_files"):
        for f in getattr(cfg.data, key):
            _record_file(f, f"data.{key}")
    if cfg.data.media_root:
        check.input_dir(cfg.data.media_root, "data.media_root")
    check.output_dir(cfg.training.run_dir, "training.run_dir", overwrite=True)
    if cfg.checkpoint.save_dir:
        check.output_dir(cfg.checkpoint.save_dir, "checkpoint.save_dir", overwrite=True)
    load_reward_function(cfg.algorithm.reward_function)


def main(argv=None) -> int:
    from megatron_ral.platform.launch_env import resolve_launch_env

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    launch = resolve_launch_env()
    validate(cfg, world_size=launch.world_size)          # every rule that needs no torch, before importing it
    preflight(cfg)
    from megatron_ral.train import train

    return train(cfg, launch)


def cli() -> None:
    """Console entry point ``megatron-ral-train``."""
    run_main("megatron-ral-train", main)


if __name__ == "__main__":
    cli()
