#!/usr/bin/env python
"""Error of top-k + tail GKD against the exact divergence on a test batch; prints a table (or --json).

The benchmark lives in megatron_ral.bench.gkd_topk; `python tools/bench/gkd_topk.py --help` lists the options.
"""

from megatron_ral.bench.gkd_topk import cli

if __name__ == "__main__":
    cli()
