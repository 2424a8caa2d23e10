"""Streaming safetensors reading and writing with bounded memory.

The safetensors format is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {...}}`` and the raw tensor
bytes. Reading here uses plain ``readinto`` into a fresh tensor (no memory map), so only the tensor being
read is resident; writing plans the whole layout first and then streams tensor bytes one at a time, so
only the tensor being written is resident.

Hugging Face sharded checkpoints are ``model-XXXXX-of-YYYYY.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map": {name: file}}``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from megatron_ral.checkpoint.errors import CheckpointFileError
from megatron_ral.checkpoint.safetensors_header import INDEX_NAME, SINGLE_NAME, parse_header, weight_files

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and byte range inside the file."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse the header of one .safetensors file and check that the data section is complete."""
    path = Path(path)
    return {name: TensorInfo(name, path, _DTYPES[e.dtype], e.shape, e.start, e.nbytes)
            for name, e in parse_header(path).items()}


def read_tensor(info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read one tensor (or rows [a, b) of its first dimension) from disk into a new CPU tensor."""
    shape = info.shape
    start, nbytes = info.start, info.nbytes
    if rows is not None:
        a, b = rows
        if not shape or not 0 <= a <= b <= shape[0]:
            raise ValueError(f"{info.name}: rows {rows} outside shape {shape}")
        row_bytes = info.nbytes // shape[0] if shape[0] else 0
        start, nbytes = info.start + a * row_bytes, (b - a) * row_bytes
        shape = (b - a, *shape[1:])
    buf = torch.empty(nbytes, dtype=torch.uint8)
    try:
        with open(info.path, "rb") as f:
            f.seek(start)
            got = f.readinto(memoryview(buf.numpy())) if nbytes else 0
    except OSError as e:
        raise CheckpointFileError(f"{info.path}: cannot read tensor {info.name!r} ({e})") from None
    if got != nbytes:
        raise CheckpointFileError(f"{info.path}: truncated while reading tensor {info.name!r}")
    return buf.view(info.dtype).reshape(shape)


class HFCheckpointReader:
    """The tensors of a Hugging Face checkpoint directory, sharded (index.json) or single-file.

    Only headers are read up front; `get(name)` reads one tensor. Missing shards and truncated or corrupt
    files raise `CheckpointFileError` naming the file.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        files, weight_map = weight_files(self.directory)
        index = self.directory / INDEX_NAME
        self.infos: dict[str, TensorInfo] = {}
        for fname in files:
            for name, info in read_header(self.directory / fname).items():
                if name in self.infos:
                    raise CheckpointFileError(f"{info.path}: tensor {name!r} also in {self.infos[name].path}")
                self.infos[name] = info
        if weight_map is not None:
            for name, fname in weight_map.items():
                info = self.infos.get(name)
                if info is None or info.path.name != fname:
                    raise CheckpointFileError(
                        f"{self.directory / fname}: does not contain {name!r} listed in {index.name}")

    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return read_tensor(self.infos[name], rows)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, file by file in on-disk order."""
        for info in sorted(self.infos.values(), key=lambda i: (str(i.path), i.start)):
            yield info.name, read_tensor(info)


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to be written: name, dtype and shape, known before its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


def plan_shards(tensors: Iterable[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Group tensors, in the given order, into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[TensorPlan]] = []
    current: list[TensorPlan] = []
    size = 0
    for t in tensors:
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(plans: list[TensorPlan], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offsets: dict[str, int] = {}
    pos = 0
    for p in plans:
        header[p.name] = {"dtype": dtype_name(p.dtype), "shape": list(p.shape), "data_offsets": [pos, pos + p.nbytes]}
        offsets[p.name] = pos
        pos += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class SafetensorsShardWriter:
    """Write one .safetensors file whose tensor list is fixed up front; data arrives tensor by tensor.

    Tensors must be written in plan order; a tensor may arrive in row blocks (`write(name, block)` several
    times, blocks along dim 0 in order). `close()` checks that every byte was written.
    """

    def __init__(self, path: Path, plans: list[TensorPlan], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.plans = plans
        header, _ = _header_bytes(plans, metadata or {"format": "pt"})
        self._f = open(self.path, "wb")
        self._f.write(header)
        self._i = 0
        self._written = 0  # bytes of the current tensor

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._i >= len(self.plans):
            raise RuntimeError(f"{self.path}: unexpected extra tensor {name!r}")
        plan = self.plans[self._i]
        if name != plan.name:
            raise RuntimeError(f"{self.path}: expected tensor {plan.name!r}, got {name!r}")
        if tensor.dtype != plan.dtype:
            raise RuntimeError(f"{self.path}: tensor {name!r} has dtype {tensor.dtype}, planned {plan.dtype}")
        if tuple(tensor.shape[1:]) != plan.shape[1:] and tuple(tensor.shape) != plan.shape:
            raise RuntimeError(f"{self.path}: tensor {name!r} block shape {tuple(tensor.shape)} vs {plan.shape}")
        data = tensor.detach().contiguous().cpu()
        nbytes = data.numel() * data.element_size()
        if self._written + nbytes > plan.nbytes:
            raise RuntimeError(f"{self.path}: tensor {name!r} receives more bytes than planned")
        if nbytes:
            self._f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._written += nbytes
        if self._written == plan.nbytes:
            self._i += 1
            self._written = 0

    def close(self) -> None:
        complete = self._i == len(self.plans)
        if complete:
            self._f.flush()
            os.fsync(self._f.fileno())
        self._f.close()
        if not complete:
            missing = [p.name for p in self.plans[self._i:]]
            raise RuntimeError(f"{self.path}: tensors not written: {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def abort(self) -> None:
        self._f.close()


class ShardedSafetensorsWriter:
    """Write a Hugging Face sharded checkpoint (model-XXXXX-of-YYYYY.safetensors + index) tensor by tensor.

    The full list of tensors (name, dtype, shape) is given up front, which fixes the shard layout and the
    headers; then `write(name, tensor)` is called in that order and streams each tensor to disk.
    """

    def __init__(self, directory: str | os.PathLike, plans: list[TensorPlan], max_shard_bytes: int = 5 * 1024**3,
                 metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.metadata = metadata or {"format": "pt"}
        self.shards = plan_shards(plans, max_shard_bytes)
        self.files = shard_file_names(len(self.shards))
        self.order = [p.name for shard in self.shards for p in shard]
        if len(set(self.order)) != len(self.order):
            raise ValueError("duplicate tensor names in the write plan")
        self._shard = -1
        self._writer: SafetensorsShardWriter | None = None
        self._pos = 0  # index into self.order of the tensor being written

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._shard += 1
        self._writer = SafetensorsShardWriter(self.directory / self.files[self._shard], self.shards[self._shard],
                                              self.metadata)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._writer is None or self._writer._i >= len(self._writer.plans):
            self._open_next()
        self._writer.write(name, tensor)

    def close(self) -> None:
        while self._shard < len(self.shards) - 1:  # surface unwritten shards as an error from the shard writer
            self._open_next()
        if self._writer is not None:
            self._writer.close()
        if len(self.shards) > 1:
            weight_map = {p.name: self.files[i] for i, shard in enumerate(self.shards) for p in shard}
            total = sum(p.nbytes for shard in self.shards for p in shard)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


def write_sharded(directory: str | os.PathLike, plans: list[TensorPlan], tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int = 5 * 1024**3) -> list[str]:
    """Write (name, tensor) pairs, arriving in plan order, as a sharded HF checkpoint; return the file names."""
    writer = ShardedSafetensorsWriter(directory, plans, max_shard_bytes)
    try:
        for name, tensor in tensors:
            writer.write(name, tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer.files
