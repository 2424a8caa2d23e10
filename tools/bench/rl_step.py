#!/usr/bin/env python
"""RL step-time breakdown: GRPO vs RAL on the same model and batches, one process, JSON out.

    python tools/bench/rl_step.py [--preset small] [--config-json '{"text_config": {...}}'] [--prompts 8]
        [--group-size 8] [--updates 2] [--max-new-tokens 64] [--steps 3] [--warmup 1] [--repeats 1]

Prints the median seconds of each phase (generate / old pass / reference pass / updates / step) of both
algorithms, the ratio RAL / GRPO of the step time and whether it meets the goal (<= 1.25). See
megatron_ral/rl/benchmark.py for what is measured.
"""

from __future__ import annotations

import json
import os

import torch

from megatron_ral.arguments import ToolParser
from megatron_ral.entry import prog_name, run_main
from megatron_ral import input_checks as check
from megatron_ral.rl.benchmark import run_rl_step_benchmark


def main(argv: list[str] | None = None) -> int:
    p = ToolParser(prog=prog_name("rl_step.py"), description=__doc__)
    p.add_argument("--preset", default="small", choices=["tiny", "small"], help="tiny-checkpoint preset")
    p.add_argument("--config-json", default=None,
                   help="HF config overrides merged into the preset, e.g. 7B proportions")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="responses per prompt (G)")
    p.add_argument("--updates", type=int, default=2, help="optimizer steps per rollout batch")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length cap")
    p.add_argument("--max-frames", type=int, default=8, help="frames per video")
    p.add_argument("--pixels", type=int, default=12544, help="pixels per frame / image")
    p.add_argument("--records", type=int, default=40, help="synthetic records written")
    p.add_argument("--steps", type=int, default=3, help="measured steps per algorithm")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per algorithm")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of the GRPO/RAL pair, in alternating order; medians over all of them")
    p.add_argument("--seed", type=int, default=0, help="weights, data and sampling seed")
    args = p.parse_args(argv)
    args.config_json = check.json_text(args.config_json, "--config-json") if args.config_json else None
    for flag in ("prompts", "group_size", "updates", "micro_batch_size", "max_new_tokens", "records", "steps",
                 "repeats"):
        check.at_least(getattr(args, flag), 1, f"--{flag.replace('_', '-')}")
    check.at_least(args.max_frames, 2, "--max-frames")  # a video is at least one temporal patch of 2 frames
    check.at_least(args.warmup, 0, "--warmup")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    print(json.dumps(run_rl_step_benchmark(args)))
    return 0


if __name__ == "__main__":
    run_main(prog_name("rl_step.py"), main)
