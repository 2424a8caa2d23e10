#!/usr/bin/env python
"""Benchmark the attention-policy capture against the eager all-heads reference; prints one JSON object.

The benchmark lives in megatron_ral.bench.attention_capture; `python tools/bench/attention_capture.py --help` lists the options.
"""

from megatron_ral.bench.attention_capture import cli

if __name__ == "__main__":
    cli()
