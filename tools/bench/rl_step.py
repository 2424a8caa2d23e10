#!/usr/bin/env python
"""RL step-time breakdown: GRPO vs RAL on the same model and batches, one process, JSON out.

The benchmark lives in megatron_ral.bench.rl_step; `python tools/bench/rl_step.py --help` lists the options.
"""

from megatron_ral.bench.rl_step import cli

if __name__ == "__main__":
    cli()
