"""Save and load a megatron model's weights as a layout-free torch_dist checkpoint.

    save_model_weights(model, ckpt_dir, hf_dir=...)   # every rank calls it; HF side files copied by rank 0
    load_model_weights(model, ckpt_dir)               # any TP/PP layout; ckpt_dir may be a run directory

Linear and attention modules carry an ``_extra_state`` object in the sharded state dict (None for the
local spec, FP8 metadata for Transformer Engine). A checkpoint written with one spec therefore lacks
some of the objects the other spec asks for (e.g. TE's core-attention state); those are skipped on load
and the modules keep their freshly initialised state. Missing tensors are always an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_ral.checkpoint.convert import CheckpointMismatchError, resolve_dist_dir
from megatron_ral.checkpoint.dist_ckpt_io import DistCheckpointReader
from megatron_ral.checkpoint.output_dir import copy_hf_side_files

_EXTRA_STATE = "_extra_state"


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_model_weights(model, ckpt_dir: str | os.PathLike, hf_dir: str | os.PathLike | None = None) -> Path:
    """Save `model.sharded_state_dict()` to ckpt_dir (torch_dist); copy the HF config/tokenizer files from
    hf_dir so that the checkpoint stays self-describing (tools/convert_megatron_to_hf.py needs them)."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if _is_rank0():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir))
    if hf_dir is not None and _is_rank0():
        copy_hf_side_files(hf_dir, ckpt_dir)
    _barrier()
    return ckpt_dir


def load_model_weights(model, ckpt_dir: str | os.PathLike) -> Path:
    """Load the weights of a torch_dist checkpoint (saved at any TP/PP, or converted from HF) into `model`."""
    from megatron.core import dist_checkpointing

    dist_dir = resolve_dist_dir(ckpt_dir)
    sharded = model_load_request(model, DistCheckpointReader(dist_dir).object_keys())
    loaded = dist_checkpointing.load(sharded, str(dist_dir))
    # a training checkpoint's common state (optimizer, scheduler, train state) comes back beside the model
    apply_model_state(model, {k: v for k, v in loaded.items() if k in sharded}, dist_dir)
    return dist_dir


def model_load_request(model, stored_objects) -> dict:
    """`model.sharded_state_dict()` without the ``_extra_state`` objects the checkpoint does not store
    (`stored_objects`: the checkpoint's object keys, e.g. ``DistCheckpointReader.object_keys()``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    present = set(stored_objects)
    sharded = model.sharded_state_dict()
    skipped = [k for k, v in sharded.items()
               if isinstance(v, ShardedObject) and k.endswith(_EXTRA_STATE) and v.unique_key not in present]
    for k in skipped:
        del sharded[k]
    return sharded


def apply_model_state(model, state: dict, where: str | os.PathLike) -> None:
    """Copy a loaded model state into `model`; every parameter and buffer must be there (``_extra_state``
    may be missing, see the module docstring)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(_EXTRA_STATE)]
    if missing or unexpected:
        raise CheckpointMismatchError(f"{where}: model keys missing from the load {missing[:8]}, "
                                      f"unexpected {unexpected[:8]}")
