#!/usr/bin/env python
"""MVBench question file(s) -> Video-R1 multiple-choice records for tools/evaluate.py.

The command line lives in megatron_ral.cli.eval_data; `python tools/eval_data/convert_mvbench.py --help` lists
the options.
"""

from megatron_ral.cli.eval_data import mvbench_cli

if __name__ == "__main__":
    mvbench_cli()
