"""Errors about checkpoint files and output directories (all input errors: one line, exit 2 in a tool)."""

from __future__ import annotations

from megatron_ral.errors import UserError
from megatron_ral.models.qwen25vl.arch import UnsupportedCheckpointError  # noqa: F401 - defined with the model


class CheckpointFileError(UserError, RuntimeError):
    """A checkpoint file is missing, truncated or malformed (the message names the file)."""




class CheckpointMismatchError(UserError, ValueError):
    """The tensors of a checkpoint do not match what its config describes."""


class OutputExistsError(UserError, FileExistsError):
    """An output path exists and may not be replaced (no --overwrite)."""
