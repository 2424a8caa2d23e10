"""``python -m megatron_ral.cli.run_state --config FILE [section.key=value ...]``: should the job go on?

Asked by a job script after the trainer exited 0 (``examples/slurm/train.sbatch``): prints one line on
stdout, ``requeue`` when the run stopped early on a signal after saving (``RUN_DIR/STOPPED_EARLY``, see
:mod:`megatron_ral.checkpoint.stop_marker`), ``done`` otherwise; ``--json`` prints
``{"run_dir", "state", "stopped_early"}`` instead (stopped_early: the marker's step, total_steps, reason,
checkpoint, time; null). The run directory comes from the same configuration and overrides the trainer
was given (or ``--run-dir``). Bad input: one line, exit 2. Imports no torch.
"""

from __future__ import annotations

import json
from typing import NoReturn, Sequence

from megatron_ral.cli.arguments import ToolParser, add_json
from megatron_ral.cli.entry import run_main
from megatron_ral.errors import UsageError

PROG = "python -m megatron_ral.cli.run_state"
REQUEUE, DONE = "requeue", "done"


def parser() -> ToolParser:
    p = ToolParser(prog=PROG, description=(
        "Print 'requeue' when the run stopped early on a signal after saving a checkpoint (RUN_DIR/STOPPED_EARLY),\n"
        "'done' otherwise. Give the trainer's --config and overrides, or --run-dir."))
    p.add_argument("--config", default=None, help="the trainer's YAML configuration")
    p.add_argument("--run-dir", default=None, help="the run directory itself (instead of --config)")
    add_json(p, "run_dir, state and the marker")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="the trainer's overrides")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_ral.checkpoint.stop_marker import read_stop_marker

    args = parser().parse_args(argv)
    if args.run_dir is not None:
        if args.config is not None or args.overrides:
            raise UsageError("--run-dir: give either --run-dir or the trainer's --config and overrides, not both")
        run_dir = args.run_dir
    else:
        from megatron_ral.config import load_config

        run_dir = load_config(args.config, args.overrides).training.run_dir
    marker = read_stop_marker(run_dir)
    state = REQUEUE if marker is not None else DONE
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), "state": state, "stopped_early": marker}))
    else:
        print(state)
    return 0


def cli() -> NoReturn:
    run_main(PROG, main)  # run as a module (argv[0] is this file's path, not a name to show)


if __name__ == "__main__":
    cli()
