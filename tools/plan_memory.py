#!/usr/bin/env python
"""Per-rank memory of a training layout before a cluster job (weights, optimizer, KV cache, activations, teacher).

The command line lives in megatron_ral.cli.plan_memory (also installed as the console script
`megatron-ral-plan-memory`); `python tools/plan_memory.py --help` lists the options.
"""

from megatron_ral.cli.plan_memory import cli

if __name__ == "__main__":
    cli()
