"""Turn the converters' expected failures into one clear line on stderr for the command-line tools."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from megatron_ral.checkpoint.convert import CheckpointMismatchError
from megatron_ral.checkpoint.qwen25vl_arch import UnsupportedCheckpointError
from megatron_ral.checkpoint.safetensors_io import CheckpointFileError

T = TypeVar("T")

EXPECTED_ERRORS = (CheckpointFileError, CheckpointMismatchError, UnsupportedCheckpointError, FileExistsError)


def run_tool(fn: Callable[[], T]) -> T | None:
    """Run fn; on an expected error print ``error: <message>`` to stderr and return None."""
    try:
        return fn()
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return None
