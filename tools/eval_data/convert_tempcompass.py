#!/usr/bin/env python
"""TempCompass (multi-choice) question file(s) -> Video-R1 multiple-choice records for tools/evaluate.py.

The command line lives in megatron_ral.cli.eval_data; `python tools/eval_data/convert_tempcompass.py --help` lists
the options.
"""

from megatron_ral.cli.eval_data import tempcompass_cli

if __name__ == "__main__":
    tempcompass_cli()
