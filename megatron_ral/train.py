"""``python -m megatron_ral.train --config FILE [section.key=value ...]`` (also ``megatron-ral-train``).

SFT, GRPO, RAL and RAL-zero on the Megatron-Core Qwen2.5-VL model, at any TP/PP/DP, under torchrun,
srun or plain python. The loop, top to bottom:

    config -> platform -> model, reference, optimizer, schedule, data -> maybe resume
    loop: [SFT step | rollout -> score -> old/ref pass -> updates] -> metrics -> maybe eval -> maybe save
    final save (and evaluation)

Every phase lives in ``megatron_ral.rl``; see README "Training" for the configuration and outputs. The
command line (flags, the input checks made before torch is imported, exit codes) is
``megatron_ral.cli.train``; :func:`train` is the loop it calls with a validated configuration.
"""

from __future__ import annotations

import logging

from megatron_ral.config import Config, to_dict, validate

log = logging.getLogger("megatron_ral.train")


def train(cfg: Config, launch) -> int:
    """Train with a configuration already validated without torch (``launch``: the launcher's ranks)."""
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



if __name__ == "__main__":
    from megatron_ral.cli.train import cli

    cli()
