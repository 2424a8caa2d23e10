"""``python -m megatron_ral.train --config FILE [section.key=value ...]`` (also ``megatron-ral-train``).

SFT, GRPO, RAL and RAL-zero on the Megatron-Core Qwen2.5-VL model, at any TP/PP/DP, under torchrun,
srun or plain python. The loop, top to bottom:

    config -> platform -> model, reference, optimizer, schedule, data -> maybe resume
    loop: [SFT step | rollout -> score -> old/ref pass -> updates] -> metrics -> maybe eval -> maybe save
    final save (and evaluation)

Every phase lives in ``megatron_ral.rl``; see README "Training" for the configuration and outputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megatron_ral.arguments import ToolParser
from megatron_ral.config import Config, load_config, to_dict, validate
from megatron_ral.entry import run_main
from megatron_ral.errors import UserError

log = logging.getLogger("megatron_ral.train")


def parse_args(argv):
    p = ToolParser(prog="megatron-ral-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML run configuration (defaults for everything not given)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. algorithm.lambda_attn=5")
    return p.parse_args(argv)


def _record_file(path: str, key: str) -> None:
    """A Video-R1 record file: present, not empty, a JSON array or JSON lines (first non-blank byte)."""
    from megatron_ral import input_checks as check

    p = check.input_file(path, key)
    with open(p, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        raise UserError(f"{key} {path}: empty file (expected a JSON array or JSON lines of Video-R1 records)")
    if head[:1] not in (b"[", b"{"):
        raise UserError(f"{key} {path}: not a JSON array or JSON lines file of Video-R1 records")


def preflight(cfg: Config) -> None:
    """Inputs and outputs checked before torch is imported (one line naming the key)."""
    from megatron_ral import input_checks as check
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
    import torch

    from megatron_ral.checkpoint.run_config import write_run_config
    from megatron_ral.checkpoint.stop_marker import clear_stop_marker, write_stop_marker
    from megatron_ral.checkpoint.training import TrainCheckpointer
    from megatron_ral.logging import MetricsSink, setup_logging
    from megatron_ral.platform import destroy, initialize
    from megatron_ral.platform.preemption import PreemptionFlag
    from megatron_ral.rl import trainer as T

    validate(cfg, world_size=launch.world_size, cuda_available=torch.cuda.is_available())
    setup_logging()
    info = initialize(cfg.parallel, seed=cfg.training.seed, launch=launch)
    preempt = PreemptionFlag(enabled=cfg.checkpoint.save_on_sigterm)  # a signal during start-up stops after step 1
    try:
        if info.rank == 0:                                          # the resolved config kept; this run in charge
            write_run_config(cfg.training.run_dir, to_dict(cfg))
            clear_stop_marker(cfg.training.run_dir)
        run = T.build(cfg, info)                                    # model (DDP), reference, optimizer, schedule, data
        ckpt = TrainCheckpointer(run.save_dir, cfg.checkpoint.keep_last, hf_dir=run.hf_dir, run_config=to_dict(cfg))
        start = T.maybe_resume(run, ckpt, cfg) + 1                  # the step to run next
        with MetricsSink(cfg.training.run_dir, cfg.logging, to_dict(cfg), rank=info.rank) as sink:
            if cfg.training.eval_at_start and start == 1:
                sink.log(0, T.evaluate_now(run, cfg))
            bar = T.progress_bar(run, start)
            for step in range(start, run.total_steps + 1):
                metrics = T.train_step(run, cfg, step)              # SFT step, or rollout -> passes -> updates
                if cfg.training.eval_interval and step % cfg.training.eval_interval == 0 and step < run.total_steps:
                    metrics.update(T.evaluate_now(run, cfg))
                sink.log(step, metrics)
                T.report(run, cfg, bar, step, metrics)
                stop = preempt.requested()
                if stop or (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0):
                    T.save(run, ckpt, step)
                if stop:
                    if info.rank == 0:                              # the job script requeues on it
                        write_stop_marker(cfg.training.run_dir, step, run.total_steps, preempt.signal_name,
                                          ckpt.latest())
                    log.warning("stopped by signal after step %d (checkpoint saved)", step)
                    return 0
            if cfg.checkpoint.save_final and (start <= run.total_steps or not ckpt.latest()):
                T.save(run, ckpt, run.total_steps)
            if cfg.training.eval_at_end and run.data.eval_cfg is not None:
                final = T.evaluate_now(run, cfg)
                sink.log(run.total_steps, final)
                T.report_eval(run, final)
        return 0
    finally:
        destroy()


def cli() -> None:
    """Console entry point ``megatron-ral-train``."""
    run_main("megatron-ral-train", main)


if __name__ == "__main__":
    cli()
