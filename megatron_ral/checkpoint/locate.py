"""What a checkpoint path holds, read from file names alone (no torch, no tensor reads).

    resolve_dist_dir(path)      # the torch_dist directory: path itself or its latest iter_* checkpoint
    find_hf_config_dir(...)     # where the HF config / tokenizer files of a Megatron checkpoint live
    megatron_checkpoint(path, "--ckpt") / hf_checkpoint(path, "--hf")   # flag checks, one line per mistake

The tools call the last two before they import torch, so a wrong path fails in a fraction of a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_ral.checkpoint.errors import CheckpointFileError, UnsupportedCheckpointError
from megatron_ral.checkpoint.run_dir import is_dist_checkpoint  # noqa: F401 - re-exported

def check_dist_backend(dist_dir: str | os.PathLike) -> None:
    """metadata.json of a torch_dist checkpoint (when present) names the torch_dist backend."""
    backend = Path(dist_dir) / "metadata.json"
    if not backend.is_file():
        return
    try:
        meta = json.loads(backend.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFileError(f"{backend}: corrupt ({e})") from None
    name = meta.get("sharded_backend") if isinstance(meta, dict) else None
    if name != "torch_dist":
        raise CheckpointFileError(f"{backend}: sharded backend {name!r} is not supported (torch_dist only)")


def has_hf_weights(directory: str | os.PathLike) -> bool:
    """True for a directory with safetensors weights (model.safetensors, an index or shards)."""
    d = Path(directory)
    return d.is_dir() and any(d.glob("*.safetensors")) or (d / "model.safetensors.index.json").is_file()


def resolve_dist_dir(ckpt: str | os.PathLike) -> Path:
    """The torch_dist directory of `ckpt`: itself, or the latest complete ``iter_*`` checkpoint of a megatron
    run directory (the one ``latest_checkpointed_iteration.txt`` names; ``iter_N.tmp`` saves never count)."""
    from megatron_ral.checkpoint.run_dir import TRACKER_FILE, latest_checkpoint, read_tracker

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointFileError(f"{ckpt}: checkpoint directory not found")
    if is_dist_checkpoint(ckpt):
        return ckpt
    latest = latest_checkpoint(ckpt)
    if latest is not None:
        return latest
    tag = read_tracker(ckpt)
    if tag is not None:
        raise CheckpointFileError(f"{ckpt / TRACKER_FILE}: names {tag!r}, which is not a complete torch_dist "
                                  f"checkpoint, and there is no other")
    raise CheckpointFileError(f"{ckpt}: not a megatron torch_dist checkpoint (no .metadata / metadata.json, "
                              f"no iter_* subdirectory)")


def find_hf_config_dir(dist_dir: str | os.PathLike, ckpt: str | os.PathLike) -> Path:
    """The directory with the HF config.json of a Megatron checkpoint: the dist dir, ``ckpt`` or its parent."""
    dist_dir, ckpt = Path(dist_dir), Path(ckpt)
    for d in (dist_dir, ckpt, dist_dir.parent):
        if (d / "config.json").is_file():
            return d
    raise UnsupportedCheckpointError(
        f"{ckpt}: no HF config.json next to the checkpoint; pass --hf-config DIR (an HF Qwen2.5-VL directory)")


def megatron_checkpoint(path: str | os.PathLike, flag: str = "--ckpt") -> Path:
    """The torch_dist directory behind the ``flag`` argument, or one line saying what the path is instead."""
    p = Path(path)
    if not p.exists():
        raise CheckpointFileError(f"{flag} {path}: no such directory")
    if not p.is_dir():
        raise CheckpointFileError(f"{flag} {path}: not a directory (a Megatron checkpoint is a directory)")
    try:
        dist_dir = resolve_dist_dir(p)
    except CheckpointFileError:
        if has_hf_weights(p):
            raise CheckpointFileError(
                f"{flag} {path}: a Hugging Face checkpoint (*.safetensors), not a Megatron one; convert it "
                f"with convert_hf_to_megatron.py --hf {path} --out DIR") from None
        raise CheckpointFileError(f"{flag} {path}: not a Megatron torch_dist checkpoint (no .metadata, "
                                  f"no iter_* checkpoint)") from None
    check_dist_backend(dist_dir)
    return dist_dir


def hf_checkpoint(path: str | os.PathLike, flag: str = "--hf", *, weights: bool = True) -> Path:
    """The ``flag`` argument as an HF directory with config.json (and safetensors weights when ``weights``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointFileError(f"{flag} {path}: no such directory")
    if not p.is_dir():
        raise CheckpointFileError(f"{flag} {path}: not a directory (a Hugging Face checkpoint is a directory)")
    if weights and not has_hf_weights(p) and (is_dist_checkpoint(p) or any(p.glob("iter_*"))):
        raise CheckpointFileError(
            f"{flag} {path}: a Megatron checkpoint, not a Hugging Face one; convert it with "
            f"convert_megatron_to_hf.py --ckpt {path} --out DIR")
    if not (p / "config.json").is_file():
        raise CheckpointFileError(f"{flag} {path}: no config.json (not a Hugging Face checkpoint directory)")
    if weights and not has_hf_weights(p):
        raise CheckpointFileError(f"{flag} {path}: no *.safetensors weights")
    return p


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PROCESSOR_FILE = "preprocessor_config.json"


def processor_dir(path: str | os.PathLike, flag: str = "--hf") -> Path:
    """The ``flag`` argument as a directory with what prompts are built from: config.json, a tokenizer and
    preprocessor_config.json (an HF checkpoint, or a Megatron checkpoint carrying its HF files)."""
    p = hf_checkpoint(path, flag, weights=False)
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointFileError(f"{flag} {path}: no tokenizer ({' / '.join(TOKENIZER_FILES)})")
    if not (p / PROCESSOR_FILE).is_file():
        raise CheckpointFileError(f"{flag} {path}: no {PROCESSOR_FILE} (image/video preprocessing settings)")
    return p
