#!/usr/bin/env python
"""Video decode benchmark: DALI (CPU, VP9) vs PyAV on the same clips at 1 and 2 fps; prints JSON.

The benchmark lives in megatron_ral.bench.decode; `python tools/bench/decode.py --help` lists the options.
"""

from megatron_ral.bench.decode import cli

if __name__ == "__main__":
    cli()
