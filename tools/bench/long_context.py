#!/usr/bin/env python
"""Peak memory per rank and time of one RAL update at T = 4k..32k tokens, CP=1 against CP=2 (CPU, gloo).

The benchmark lives in megatron_ral.bench.long_context; `python tools/bench/long_context.py --help` lists the options.
"""

from megatron_ral.bench.long_context import cli

if __name__ == "__main__":
    cli()
