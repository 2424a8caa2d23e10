"""The one base class for errors caused by the user's input.

Every entry point (tools, ``python -m megatron_ral.config``, the trainer) runs under
:func:`megatron_ral.entry.run_main`: a :class:`UserError` prints ``<prog>: error: <message>`` once on
stderr and exits with code 2; any other exception is a bug and keeps its traceback.

The library's input errors derive from it: configuration values (``config.ConfigError``), records and
media (``data.errors.DataError`` and its ``MediaError`` / ``RecordError``), record files, checkpoint
files and layouts (``checkpoint``), sampling values and process layouts of the tools. Raise one of
them (or ``UserError`` itself) with a message that names the file, key or flag.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in what the user gave us (a file, a flag, a config key, a layout); not a bug."""
