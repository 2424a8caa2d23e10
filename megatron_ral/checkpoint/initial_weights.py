"""Where a model's starting weights come from: a Megatron checkpoint, or an HF directory converted once.

    path = initial_weights_dir(load, hf_path, run_dir / "initial_mcore")     # every rank calls it

``load`` (a Megatron dist checkpoint or training run directory, any layout) wins when given. Otherwise
``hf_path`` is converted with the streaming converter into ``conversion_dir``: global rank 0 converts,
the other ranks wait, and every rank gets the same path. The conversion records what it was made from
(``.converted_from.json``: the HF directory and the size and modification time of its weight and config
files), so a later run with the same ``conversion_dir`` reuses it, and a changed source is converted
again. ``conversion_dir`` must be visible to every rank (a run directory on a shared filesystem).

The trainer's policy uses it with ``model.load`` / ``model.hf_path``; a teacher model does the same with
its own keys and directory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch.distributed as dist

from megatron_ral.checkpoint.errors import CheckpointFileError
from megatron_ral.checkpoint.locate import is_dist_checkpoint
from megatron_ral.errors import UserError

log = logging.getLogger(__name__)

STAMP = ".converted_from.json"
_SOURCE_SUFFIXES = (".safetensors", ".json")


def source_stamp(hf_path: str | os.PathLike) -> dict:
    """What identifies an HF directory's contents cheaply: its absolute path and (size, mtime_ns) of its
    weight and JSON files (config, index, tokenizer)."""
    d = Path(hf_path).resolve()
    files = {}
    for p in sorted(d.iterdir()):
        if p.is_file() and p.name.endswith(_SOURCE_SUFFIXES):
            st = p.stat()
            files[p.name] = [st.st_size, st.st_mtime_ns]
    return {"hf_path": str(d), "files": files}


def conversion_is_current(conversion_dir: str | os.PathLike, hf_path: str | os.PathLike) -> bool:
    """True when ``conversion_dir`` holds a complete conversion of ``hf_path`` as it is now."""
    out = Path(conversion_dir)
    stamp = out / STAMP
    if not (is_dist_checkpoint(out) and stamp.is_file()):
        return False
    try:
        return json.loads(stamp.read_text()) == source_stamp(hf_path)
    except (OSError, json.JSONDecodeError):
        return False


def _convert(hf_path: str, out: Path) -> None:
    from megatron_ral.checkpoint.convert import hf_to_megatron

    if is_dist_checkpoint(out):
        log.warning("%s was converted from another source than %s; converting again", out, hf_path)
    log.info("converting %s to a Megatron checkpoint at %s (no Megatron checkpoint given)", hf_path, out)
    hf_to_megatron(hf_path, out, overwrite=True, progress=False)
    (out / STAMP).write_text(json.dumps(source_stamp(hf_path), indent=1) + "\n")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def initial_weights_dir(load: str, hf_path: str, conversion_dir: str | os.PathLike) -> Path:
    """The Megatron checkpoint to load: ``load``, else ``hf_path`` converted (once) into ``conversion_dir``.

    Collective when torch.distributed is initialised and ``load`` is empty: call it on every rank. A
    failed conversion raises on every rank (rank 0 with the converter's error, the others naming it).
    """
    if load:
        return Path(load)
    if not hf_path:
        raise UserError("model.hf_path / model.load: give the model (an HF directory or a Megatron checkpoint)")
    out = Path(conversion_dir)
    shared = _distributed()
    outcome: list = [None]  # rank 0's failure, sent to the others
    if not shared or dist.get_rank() == 0:
        try:
            if conversion_is_current(out, hf_path):
                log.info("reusing the conversion of %s at %s", hf_path, out)
            else:
                _convert(hf_path, out)
        except BaseException as e:
            if shared:
                dist.broadcast_object_list([f"{type(e).__name__}: {e}"], src=0)
            raise
    if shared:
        dist.broadcast_object_list(outcome, src=0)  # the others wait here until rank 0 is done
        if outcome[0] is not None:
            err = CheckpointFileError(f"{out}: rank 0 could not convert {hf_path} ({outcome[0]})")
            err.same_on_every_rank = True  # rank 0 reports its own error
            raise err
    if not is_dist_checkpoint(out):
        raise CheckpointFileError(f"{out}: the conversion written by rank 0 is not visible on this rank (the run "
                                  f"directory must be on a filesystem every node shares)")
    return out
