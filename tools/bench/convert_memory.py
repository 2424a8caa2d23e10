#!/usr/bin/env python
"""Benchmark the HF <-> Megatron converters on a random checkpoint with the real Qwen2.5-VL shapes.

The benchmark lives in megatron_ral.bench.convert_memory; `python tools/bench/convert_memory.py --help` lists the options.
"""

from megatron_ral.bench.convert_memory import cli

if __name__ == "__main__":
    cli()
