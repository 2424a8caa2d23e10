"""The headers of safetensors files and the file list of a Hugging Face checkpoint, read without torch.

``parse_header`` checks one file (header length, JSON, entries, data section complete);
``weight_files`` finds the files of a checkpoint directory (index, single file or shards). The tools call
``check_weight_files`` before importing torch, so a truncated or corrupt checkpoint fails at once;
``safetensors_io`` builds its tensor reader on the same functions.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from megatron_ral.checkpoint.errors import CheckpointFileError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ELEMENT_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                 "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header: dtype name, shape, absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


def parse_header(path: str | os.PathLike) -> dict[str, HeaderEntry]:
    """Parse the header of one .safetensors file and check that the data section is complete."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"{path}: safetensors file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointFileError(f"{path}: truncated safetensors file (no header, {size} bytes)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > MAX_HEADER or 8 + hlen > size:
            raise CheckpointFileError(f"{path}: corrupt or truncated safetensors header (length {hlen}, file {size} bytes)")
        try:
            header = json.loads(f.read(hlen))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointFileError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{path}: corrupt safetensors header (not an object)")
    base = 8 + hlen
    out: dict[str, HeaderEntry] = {}
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(entry["dtype"])
            item = ELEMENT_SIZES[dtype]
            shape = tuple(int(s) for s in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFileError(f"{path}: corrupt header entry for {name!r} ({e!r})") from None
        nbytes = math.prod(shape) * item
        if end - start != nbytes or start < 0:
            raise CheckpointFileError(f"{path}: header entry {name!r} has {end - start} bytes, expected {nbytes}")
        end_max = max(end_max, end)
        out[name] = HeaderEntry(name, dtype, shape, base + start, nbytes)
    if base + end_max > size:
        raise CheckpointFileError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {base + end_max})")
    return out


def weight_files(directory: str | os.PathLike) -> tuple[list[str], dict[str, str] | None]:
    """(file names, the index's weight map or None) of an HF checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointFileError(f"{directory}: checkpoint directory not found")
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted(set(weight_map.values())), weight_map
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointFileError(f"{index}: corrupt index ({e!r})") from None
    if (directory / SINGLE_NAME).is_file():
        return [SINGLE_NAME], None
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if not shards:
        raise CheckpointFileError(f"{directory}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors files")
    return shards, None


def check_weight_files(directory: str | os.PathLike) -> None:
    """Every weight file of the checkpoint exists and has a complete, well-formed header."""
    files, _ = weight_files(directory)
    for name in files:
        parse_header(Path(directory) / name)
