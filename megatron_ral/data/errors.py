"""Error types of the input pipeline. Each carries a short machine-readable reason."""

from __future__ import annotations

from megatron_ral.errors import UserError

# Reasons a sample is skipped; each is counted and exposed as the metric `data/skipped/<reason>`.
SKIP_REASONS = (
    "missing_file",      # media path does not exist
    "empty_file",        # media file has zero bytes
    "corrupt_media",     # container/image cannot be opened or decoded
    "decoder_failed",    # the video decoder could not be set up (e.g. a DALI pipeline on this GPU)
    "no_frames",         # video with no decodable frames
    "truncated",         # fewer frames decode than the container holds
    "bad_geometry",      # size or aspect ratio outside what the vision tower accepts
    "missing_field",     # record lacks a required field or has a wrong type
    "malformed_record",  # JSON text of the record does not parse
    "prompt_too_long",   # prompt exceeds data.max_prompt_tokens
)


class DataError(UserError):
    """A sample that cannot be used. `reason` is one of SKIP_REASONS; `source` names the file."""

    def __init__(self, reason: str, source: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.reason = reason
        self.source = source
        self.detail = detail
        super().__init__(f"{reason}: {source}: {detail}")


class MediaError(DataError):
    """An image or video file that cannot be turned into pixels."""


class RecordError(DataError):
    """A dataset record that is malformed or incomplete. `source` is 'file:line'."""


class RecordFileError(UserError):
    """A record file whose structure is broken beyond one record (reported with file:line)."""


class TooManyFailuresError(UserError, RuntimeError):
    """Raised when the failed share of recent samples exceeds data.max_failure_fraction."""
