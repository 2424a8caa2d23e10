"""The resolved configuration a run was trained with, kept beside its outputs.

    RUN_DIR/config.yaml                          written by rank 0 when a run (or a resumed run) starts
    RUN_DIR/checkpoints/iter_N/run_config.yaml   the same, inside every training checkpoint

Both are the YAML of ``to_dict(cfg)`` (every key, defaults included), so ``load_config(path)`` rebuilds
the configuration. A resumed run rewrites ``RUN_DIR/config.yaml`` with its own configuration (e.g. more
steps); each checkpoint keeps the one its run had. Files only: no torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

RUN_CONFIG = "config.yaml"
CHECKPOINT_CONFIG = "run_config.yaml"
DEFAULT_SAVE_DIR = "checkpoints"  # RUN_DIR/checkpoints: the trainer's default checkpoint.save_dir


def _write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def config_text(config: Mapping[str, Any]) -> str:
    """The YAML of a resolved configuration (sections in their declared order)."""
    import yaml

    header = "# resolved configuration of this run (python -m megatron_ral.config --config THIS_FILE)\n"
    return header + yaml.safe_dump(dict(config), sort_keys=False)


def write_run_config(run_dir: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """``RUN_DIR/config.yaml`` (the directory is created)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return _write_atomic(run_dir / RUN_CONFIG, config_text(config))


def write_checkpoint_config(checkpoint_dir: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """``iter_N/run_config.yaml`` in a checkpoint being written."""
    return _write_atomic(Path(checkpoint_dir) / CHECKPOINT_CONFIG, config_text(config))


def find_run_config(path: str | os.PathLike) -> Path | None:
    """The kept configuration for `path`: a checkpoint's own ``run_config.yaml``, else a run directory's
    ``config.yaml``; in the default layout (``RUN_DIR/checkpoints/iter_N``) a checkpoint without its own
    (written before configurations were kept) and the ``checkpoints`` directory fall back to RUN_DIR's.
    None when there is none."""
    path = Path(path)
    candidates = [path / CHECKPOINT_CONFIG, path / RUN_CONFIG]
    if path.name == DEFAULT_SAVE_DIR:
        candidates.append(path.parent / RUN_CONFIG)
    elif path.parent.name == DEFAULT_SAVE_DIR:
        candidates.append(path.parent.parent / RUN_CONFIG)
    return next((c for c in candidates if c.is_file()), None)


__all__ = ["CHECKPOINT_CONFIG", "RUN_CONFIG", "config_text", "find_run_config", "write_checkpoint_config",
           "write_run_config"]
