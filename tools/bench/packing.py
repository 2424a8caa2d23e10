#!/usr/bin/env python
"""Training passes of one RAL rollout batch with training.packing none / sequences / groups: wall and CPU time,
peak memory, token positions, the LM head apart; prints a table (or --json).

The benchmark lives in megatron_ral.bench.packing; `python tools/bench/packing.py --help` lists the options.
"""

from megatron_ral.bench.packing import cli

if __name__ == "__main__":
    cli()
