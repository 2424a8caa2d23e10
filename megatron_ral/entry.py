"""The one way every entry point ends on bad input.

    def main(argv=None) -> int: ...
    if __name__ == "__main__":
        run_main("generate.py", main)

A :class:`~megatron_ral.errors.UserError` prints ``<prog>: error: <message>`` on stderr and exits with
code 2; ``MEGATRON_RAL_DEBUG=1`` also prints its traceback. Any other exception is a bug and propagates
with its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from megatron_ral.errors import UserError

USAGE_EXIT = 2


def debug_enabled() -> bool:
    return os.environ.get("MEGATRON_RAL_DEBUG", "") not in ("", "0")


def format_user_error(prog: str, err: BaseException) -> str:
    message = " ".join(str(err).split("\n")[0:1]) or type(err).__name__
    return f"{prog}: error: {message}"


def run_main(prog: str, main: Callable[[Sequence[str] | None], int | None],
             argv: Sequence[str] | None = None) -> NoReturn:
    """Call ``main(argv)`` and exit with its return code (0 for None); user errors exit 2 with one line."""
    try:
        code = main(argv)
    except UserError as e:
        if debug_enabled():
            traceback.print_exc()
        print(format_user_error(prog, e), file=sys.stderr, flush=True)
        sys.exit(USAGE_EXIT)
    sys.exit(int(code or 0))
