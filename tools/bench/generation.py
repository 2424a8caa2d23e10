#!/usr/bin/env python
"""Generation benchmark: megatron_ral KV-cache generate() vs transformers generate(), one run, JSON out.

The benchmark lives in megatron_ral.bench.generation; `python tools/bench/generation.py --help` lists the options.
"""

from megatron_ral.bench.generation import cli

if __name__ == "__main__":
    cli()
