#!/usr/bin/env python
"""Video-MME question file(s) -> Video-R1 multiple-choice records for tools/evaluate.py.

The command line lives in megatron_ral.cli.eval_data; `python tools/eval_data/convert_videomme.py --help` lists
the options.
"""

from megatron_ral.cli.eval_data import videomme_cli

if __name__ == "__main__":
    videomme_cli()
