"""The converters' command-line side: expected failures become one clear line on stderr (exit 1), a
finished conversion one JSON line on stdout (exit 0)."""

from __future__ import annotations

import json
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


def run_conversion(fn: Callable[[], T]) -> int:
    """Run a conversion; print its summary as one JSON line and return the tool's exit code."""
    result = run_tool(fn)
    if result is None:
        return 1
    print(json.dumps({"out": str(result.out_dir), "tensors": result.num_tensors, "bytes": result.total_bytes,
                      "seconds": round(result.seconds, 3)}))
    return 0
