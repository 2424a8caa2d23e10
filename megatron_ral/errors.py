"""The one base class for errors caused by the user's input.

Every entry point (tools, ``python -m megatron_ral.config``, the trainer) runs under
:func:`megatron_ral.cli.entry.run_main`: a :class:`UserError` prints ``<prog>: error: <message>`` once on
stderr and exits with code 2; any other exception is a bug and keeps its traceback.

The library's input errors derive from it: configuration values (``config.ConfigError``), records and
media (``data.errors.DataError`` and its ``MediaError`` / ``RecordError``), record files, checkpoint
files and layouts (``checkpoint.errors``), and the tools' flags (:class:`UsageError`: paths, sampling
values, process layouts). Raise one of them (or ``UserError`` itself) with a one-line message that
names the file, key or flag.

``same_on_every_rank`` tells :func:`~megatron_ral.cli.entry.run_main` who reports the error in a multi-rank
job: ``True`` when every rank raises it alike (a flag or a config value: rank 0 speaks for all),
``False`` when it concerns this rank only (a sample of its data shard: the failing rank speaks),
``None`` to decide by phase (before ``torch.distributed`` is initialised the inputs are the same on
every rank, after it they may not be).
"""

from __future__ import annotations


class UserError(Exception):
    """An error in what the user gave us (a file, a flag, a config key, a layout); not a bug."""

    same_on_every_rank: bool | None = None


class UsageError(UserError):
    """A bad command-line flag or flag value (the message names the flag)."""

    same_on_every_rank = True


class LayoutError(UserError, ValueError):
    """A parallel layout that does not fit the processes or the model (TP x PP x CP vs the world size)."""

    same_on_every_rank = True
