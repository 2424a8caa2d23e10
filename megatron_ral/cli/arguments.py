"""The command-line convention every tool follows.

* :class:`ToolParser`: help text shows each option's default; a bad flag is a
  :class:`~megatron_ral.errors.UsageError` (one line through :func:`megatron_ral.cli.entry.run_main`, printed
  once in a multi-rank job) instead of argparse's usage text on every rank.
* The same flags for the same things: ``--hf DIR`` (a Hugging Face directory), ``--ckpt DIR`` (a
  Megatron-Core distributed checkpoint), ``--out``, ``--overwrite``, ``--json`` (one JSON object on rank 0's
  stdout), ``--tp/--pp/--pp-split``, ``--dtype``, ``--image/--video``, ``--seed``.

Nothing here imports torch: a tool parses and checks its flags before loading anything heavy.
"""

from __future__ import annotations

import argparse

from megatron_ral.errors import UsageError
from megatron_ral.platform.launch_env import rank_and_world

DTYPES = ("auto", "fp32", "bf16")  # auto: bf16 on GPU, fp32 on CPU (as model.dtype in the config)


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; appends ``(default: X)`` to every option that has a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or action.required or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


class ToolParser(argparse.ArgumentParser):
    """argparse with the tools' conventions (see the module docstring)."""

    def __init__(self, prog: str | None = None, description: str | None = None, epilog: str | None = None):
        super().__init__(prog=prog, description=description, epilog=epilog, formatter_class=DefaultsHelpFormatter)

    def error(self, message: str):
        raise UsageError(message)

    def _print_message(self, message: str, file=None) -> None:
        if rank_and_world()[0] == 0:  # --help once, not once per rank
            super()._print_message(message, file)


def add_json(p: argparse.ArgumentParser, what: str = "a summary") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON object on stdout (rank 0)")


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")


def add_ckpt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True,
                   help="Megatron-Core distributed checkpoint (convert_hf_to_megatron.py output or a training "
                        "run directory; the latest iter_* is taken)")


def add_layout(p: argparse.ArgumentParser) -> None:
    """--tp, --pp, --pp-split (the process count must be TP x PP)."""
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--pp-split", default=None,
                   help="layers per pipeline stage, comma-separated, e.g. 2,1 (default: even, balanced when "
                        "PP does not divide the layers)")


def add_dtype(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--dtype", choices=DTYPES, default=default, help="model dtype (auto: bf16 on GPU, fp32 on CPU)")


def add_media(p: argparse.ArgumentParser, required: bool = False) -> None:
    media = p.add_mutually_exclusive_group(required=required)
    media.add_argument("--image", help="image file (shown before the prompt text)")
    media.add_argument("--video", help="video file (shown before the prompt text)")
