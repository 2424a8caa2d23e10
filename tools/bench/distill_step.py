#!/usr/bin/env python
"""RAL vs RAL + on-policy distillation (a teacher with twice the layers and width): step time, peak memory, the
teacher pass's share and what its forward FLOPs predict; one process, JSON out.

The benchmark lives in megatron_ral.bench.distill_step; `python tools/bench/distill_step.py --help` lists the options.
"""

from megatron_ral.bench.distill_step import cli

if __name__ == "__main__":
    cli()
