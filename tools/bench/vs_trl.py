#!/usr/bin/env python
"""Our GRPO step against TRL's GRPOTrainer: throughput and loss equality, one JSON object.

The benchmark lives in megatron_ral.bench.vs_trl; `python tools/bench/vs_trl.py --help` lists the options.
"""

from megatron_ral.bench.vs_trl import cli

if __name__ == "__main__":
    cli()
