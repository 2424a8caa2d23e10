#!/usr/bin/env python
"""Our GRPO step against TRL's GRPOTrainer: throughput and loss equality, one JSON object.

    python tools/bench/vs_trl.py [--work DIR] [--prompts 4] [--group 8] [--max-new-tokens 128]
        [--updates 2] [--epochs 1] [--temperature 1.0] [--kl-beta 0.04] [--clip-eps 0.2]
        [--loss-aggregation seq_mean_token_mean] [--warmup 1] [--steps 3] [--threads 1]
        [--image-size 224] [--repeats 1] [--trl-attn sdpa|eager] [--allow-stop] [--skip-throughput] [--skip-loss] [--out FILE.json]

Needs TRL (``pip install -e ".[bench]"``); without it, one line and exit code 2.

Throughput: the same `small`-preset checkpoint (fp32; converted to Megatron for our side, the HF
directory for TRL), the same synthetic image prompts in the same order, the same reward
(megatron_ral.rl.rewards.score), G, temperature, max new tokens, clip range, KL beta, aggregation and
optimizer steps per rollout batch (TRL: steps_per_generation x num_iterations), one CPU process each
with the same torch thread count. Each side runs in its own process, one after the other (--repeats:
alternating, the best run of each compared); `warmup` steps are left out of the figures. Reported:
prompts/s (wall and CPU time), ours / TRL, phase breakdown, the load average around each run.

Loss equality: one identical batch (same prompts, responses, advantages, old and reference log-probs)
through our loss (the trainer's micro-batched schedule, global normaliser) and TRL's compute_loss, for
each matching pair (seq_mean_token_mean <-> grpo, token_mean <-> bnpo and dapo,
seq_mean_token_sum_norm <-> dr_grpo): loss difference and gradient difference per tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace

from megatron_ral.entry import run_main
from megatron_ral.errors import UserError

PARTS = ("loss", "ours", "trl")


def parse_args(argv):
    from megatron_ral.rl.trl_peer import LOSS_TYPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", default=None, help="assets and run directories; a temporary directory when not given")
    p.add_argument("--preset", default="small", choices=["tiny", "small"], help="tiny-checkpoint preset of both sides")
    p.add_argument("--records", type=int, default=64, help="synthetic image records written")
    p.add_argument("--image-size", type=int, default=224, help="side of the square synthetic images (pixels)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per rollout batch (P)")
    p.add_argument("--group", type=int, default=8, help="responses per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="response length cap")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--updates", type=int, default=2, help="optimizer steps per rollout batch")
    p.add_argument("--epochs", type=int, default=1, help="passes over the rollout batch (updates = mini-batches x epochs)")
    p.add_argument("--kl-beta", type=float, default=0.04, help="weight of the k3 KL term to the reference")
    p.add_argument("--clip-eps", type=float, default=0.2, help="clip range of the ratio (both sides)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate")
    p.add_argument("--loss-aggregation", default="seq_mean_token_mean", choices=sorted(LOSS_TYPES),
                   help="our token aggregation; TRL gets the matching loss_type")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="our micro-batch; a whole mini-batch when not given, as TRL's per-device batch")
    p.add_argument("--warmup", type=int, default=1, help="rollout batches left out of the figures")
    p.add_argument("--steps", type=int, default=3, help="measured rollout batches")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each side")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each side, alternating (the best of each is compared; all are listed)")
    p.add_argument("--trl-attn", default="sdpa", choices=["sdpa", "eager"],
                   help="transformers attention of TRL's policy and reference (sdpa: transformers' default)")
    p.add_argument("--allow-stop", action="store_true",
                   help="let responses stop at a stop token (default: exactly max-new-tokens on both sides)")
    p.add_argument("--loss-prompts", type=int, default=2, help="prompts of the loss-equality batch")
    p.add_argument("--loss-group", type=int, default=4, help="responses per prompt of the loss-equality batch")
    p.add_argument("--loss-max-new-tokens", type=int, default=32, help="response length cap of the loss-equality batch")
    p.add_argument("--loss-micro-batch-size", type=int, default=3, help="our micro-batches of the loss batch")
    p.add_argument("--seed", type=int, default=0, help="weights, data and sampling seed")
    p.add_argument("--skip-throughput", action="store_true", help="only the loss-equality check")
    p.add_argument("--skip-loss", action="store_true", help="only the throughput comparison")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--part", choices=PARTS, default=None, help=argparse.SUPPRESS)  # one side, in a child process
    return p.parse_args(argv)


def settings(args):
    from megatron_ral.rl.trl_peer import GRPOSettings

    s = GRPOSettings(prompts_per_step=args.prompts, group_size=args.group, updates_per_rollout=args.updates,
                     epochs_per_rollout=args.epochs, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, kl_beta=args.kl_beta, clip_eps=args.clip_eps, lr=args.lr,
                     loss_aggregation=args.loss_aggregation, seed=args.seed)
    s.check()
    return s


def run_part(args) -> dict:
    """One part in this process (the parent starts one process per part)."""
    import torch

    from megatron_ral.rl import trl_benchmark as B

    torch.set_num_threads(args.threads)
    assets = B.make_assets(args.work, args.preset, args.records, args.image_size, args.seed)
    s = settings(args)
    if args.part == "ours":
        return B.run_ours(assets, s, args.warmup, args.steps, args.micro_batch_size,
                          run_dir=os.path.join(args.work, "run_ours"), allow_stop=args.allow_stop)
    if args.part == "trl":
        return B.run_trl(assets, s, args.warmup, args.steps, output_dir=os.path.join(args.work, "run_trl"),
                         allow_stop=args.allow_stop, attn_implementation=args.trl_attn)
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.platform import destroy, initialize
    from megatron_ral.rl.trl_parity import LossCase, compare_losses

    loss_s = replace(s, prompts_per_step=args.loss_prompts, group_size=args.loss_group,
                     max_new_tokens=args.loss_max_new_tokens)
    initialize(ParallelConfig(), seed=args.seed)
    try:
        return compare_losses(LossCase(assets.hf_dir, assets.mcore_dir, assets.records_file, assets.media_root,
                                       micro_batch_size=args.loss_micro_batch_size, seed=args.seed), loss_s)
    finally:
        destroy()


def child_argv(args) -> list[str]:
    """The parsed flags again, for a child process (everything but the parent-only ones)."""
    out = []
    for key, value in vars(args).items():
        if key in ("work", "out", "part", "skip_throughput", "skip_loss", "repeats"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        elif value is not None:
            out += [flag, str(value)]
    return out


def child(args, part: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRL_EXPERIMENTAL_SILENCE="1", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = os.path.join(args.work, f"{part}.log")
    cmd = [sys.executable, os.path.abspath(__file__), *child_argv(args), "--work", args.work, "--part", part]
    print(f"vs_trl: running {part} (log: {log})", file=sys.stderr, flush=True)
    with open(log, "w") as err:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"the {part} part failed (exit {done.returncode}); end of {log}:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from megatron_ral.rl.trl_peer import require_trl

    require_trl()
    if args.part is not None:
        print(json.dumps(run_part(args)))
        return 0
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="vs_trl_")
        args.work = tmp.name
    try:
        from megatron_ral.rl import trl_benchmark as B

        s = settings(args)
        B.make_assets(args.work, args.preset, args.records, args.image_size, args.seed)
        needed = (args.warmup + args.steps) * args.prompts
        if not args.skip_throughput and args.records < needed:
            raise UserError(f"--records {args.records}: the throughput part needs (warmup + steps) x prompts = {needed}")
        result = {"command": "python tools/bench/vs_trl.py " + " ".join(argv)}
        if not args.skip_loss:
            result["loss_equality"] = child(args, "loss")
        if not args.skip_throughput:
            ours, trl = [], []
            for _ in range(args.repeats):
                ours.append(child(args, "ours"))
                trl.append(child(args, "trl"))
            result["throughput"] = B.compare(ours, trl, s)
        else:
            result["settings"] = asdict(s)
    finally:
        if tmp is not None:
            tmp.cleanup()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    run_main("vs_trl.py", main)
