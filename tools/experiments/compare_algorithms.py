#!/usr/bin/env python
"""The paper's comparison at small scale (base / SFT / GRPO / RAL / RAL-zero over seeds): results.json,
results.md, curves.png, attention.png under --out.

The experiment lives in megatron_ral.bench.compare; `python tools/experiments/compare_algorithms.py --help`
lists the options.
"""

from megatron_ral.bench.compare import cli

if __name__ == "__main__":
    cli()
