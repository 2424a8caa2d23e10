"""Megatron-Core distributed checkpoints (torch_dist backend) read and written one chunk at a time.

A torch_dist checkpoint directory holds PyTorch DCP files (``.metadata`` + ``__*_*.distcp``), the
megatron ``metadata.json`` (backend names) and ``common.pt`` (the non-sharded part of the state dict).
In the DCP metadata every megatron ShardedTensor is one entry keyed by its sharded key, with its global
shape and the list of stored chunks (offsets, sizes); a ShardedObject is a bytes entry keyed by
``key/shard_<offsets>_<fragmentation>``. On load, DCP copies the overlap of the stored chunks with
each rank's local shard, so the chunking used at save time does not constrain the layout at load time.

`write_dist_checkpoint` writes such a directory from chunk specs whose data is produced on demand and
written straight away, so only one chunk is resident at a time.
`DistCheckpointReader.read` reads any rectangular region of a stored tensor, loading only the stored
chunks that overlap it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _validate_global_plan, create_default_global_save_plan
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from megatron_ral.checkpoint.errors import CheckpointFileError
from megatron_ral.checkpoint.locate import check_dist_backend, is_dist_checkpoint  # noqa: F401 - re-exported

try:  # the format version FileSystemWriter stamps into .metadata (recent torch)
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION as _DCP_VERSION
except ImportError:
    _DCP_VERSION = None

MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
DIST_FILES = (".metadata", "metadata.json", "common.pt")


@dataclass
class ChunkSpec:
    """One stored chunk of a tensor: offsets into the global tensor and a function producing its data."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    produce: Callable[[], torch.Tensor]
    label: str = ""  # progress group (e.g. "layer 3")
    order: tuple = ()  # write order key (stable sort over all chunks of all tensors)


@dataclass
class TensorSpec:
    key: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[ChunkSpec] = field(default_factory=list)


@dataclass
class BytesSpec:
    key: str
    produce: Callable[[], io.BytesIO]


def none_object_bytes() -> io.BytesIO:
    """Serialized ShardedObject payload of an ``_extra_state`` that is None (what megatron stores)."""
    buf = io.BytesIO()
    torch.save([None], buf)
    buf.seek(0)
    return buf


def _write_items(tensors: Sequence[TensorSpec], objects: Sequence[BytesSpec]
                 ) -> list[tuple[WriteItem, Callable[[], object], TensorSpec | None, ChunkSpec | None]]:
    """DCP write items (bytes first, then tensor chunks in their `order`) with their data producers."""
    items: list = [(WriteItem(index=MetadataIndex(obj.key), type=WriteItemType.BYTE_IO), obj.produce, None, None)
                   for obj in objects]
    pairs = sorted(((spec, chunk) for spec in tensors for chunk in spec.chunks), key=lambda p: p[1].order)
    for spec, chunk in pairs:
        single = len(spec.chunks) == 1 and tuple(spec.chunks[0].sizes) == tuple(spec.global_shape)
        offsets = torch.Size(chunk.offsets)
        item = WriteItem(
            index=MetadataIndex(spec.key, offsets),
            type=WriteItemType.TENSOR if single else WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(chunk.sizes)),
                properties=TensorProperties(dtype=spec.dtype),
                size=torch.Size(spec.global_shape),
            ),
        )
        items.append((item, chunk.produce, spec, chunk))
    return items


@contextlib.contextmanager
def _no_crc32():
    """Skip torch.save's per-record CRC32 (a third of the serialisation time; torch.load does not need it)."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # older torch: always computes it
        yield
        return
    saved = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = saved


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_dist_checkpoint(directory: str | os.PathLike, tensors: Sequence[TensorSpec], objects: Sequence[BytesSpec],
                          common_state: dict | None = None,
                          on_chunk: Callable[[TensorSpec, ChunkSpec], None] | None = None) -> None:
    """Write a megatron-core torch_dist checkpoint into the (existing, empty) `directory`, chunk by chunk.

    The files are those PyTorch DCP's FileSystemWriter produces for one rank: ``__0_0.distcp`` holding
    each item as ``torch.save`` bytes (tensor chunks) or raw bytes (objects), and the pickled ``.metadata``
    (global shapes, chunk lists, byte ranges). Each chunk is produced, written and released before the
    next one, so memory holds one chunk at a time.
    """
    directory = Path(directory)
    items = _write_items(tensors, objects)
    plan = SavePlan([it[0] for it in items])
    (plan,), metadata = create_default_global_save_plan([plan])
    problems = _validate_global_plan([plan], metadata)  # a list of messages (torch >= 2.9) or a bool
    if problems is False or (isinstance(problems, list) and problems):
        raise ValueError(f"chunks do not tile their tensors exactly: {problems}")
    data_name = "__0_0.distcp"
    storage: dict[MetadataIndex, _StorageInfo] = {}
    with _no_crc32(), open(directory / data_name, "wb") as f:
        for item, (_, produce, spec, chunk) in zip(plan.items, items):
            offset = f.tell()
            data = produce()
            if item.type == WriteItemType.BYTE_IO:
                f.write(data.getbuffer())
            else:
                if tuple(data.shape) != tuple(chunk.sizes) or data.dtype != spec.dtype:
                    raise RuntimeError(f"{spec.key} chunk at {chunk.offsets}: produced {tuple(data.shape)} "
                                       f"{data.dtype}, expected {tuple(chunk.sizes)} {spec.dtype}")
                data = data.detach().cpu()
                if not data.is_contiguous() or data.untyped_storage().nbytes() != data.nbytes:
                    data = data.clone(memory_format=torch.contiguous_format)  # save exactly this chunk's bytes
                torch.save(data, f)
                if on_chunk is not None:
                    on_chunk(spec, chunk)
            storage[item.index] = _StorageInfo(data_name, offset, f.tell() - offset)
            del data
        f.flush()
        os.fsync(f.fileno())
    metadata.storage_data = storage
    if _DCP_VERSION is not None:
        metadata.version = _DCP_VERSION
    metadata.storage_meta = StorageMeta(checkpoint_id=str(directory))
    buf = io.BytesIO()
    pickle.dump(metadata, buf)
    _fsync_write(directory / ".metadata", buf.getvalue())
    cbuf = io.BytesIO()
    torch.save(common_state or {}, cbuf)
    _fsync_write(directory / "common.pt", cbuf.getvalue())
    _fsync_write(directory / "metadata.json", json.dumps(MEGATRON_METADATA).encode())


class _FileSlice(io.RawIOBase):
    """A read-only, seekable view of bytes [offset, offset + length) of an open file (for torch.load)."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self._f, self._start, self._len = f, offset, length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._len}[whence]
        self._pos = min(max(base + pos, 0), self._len)
        return self._pos

    def readinto(self, b) -> int:
        n = min(len(b), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got


class DistCheckpointReader:
    """Random access to the tensors of a torch_dist checkpoint directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not (self.directory / ".metadata").is_file():
            raise CheckpointFileError(f"{self.directory}: not a torch_dist checkpoint (no .metadata file)")
        check_dist_backend(self.directory)
        try:
            self.metadata: Metadata = FileSystemReader(str(self.directory)).read_metadata()
        except Exception as e:  # pickle errors, truncation
            raise CheckpointFileError(f"{self.directory / '.metadata'}: cannot read ({e})") from None
        self._check_files()

    def _check_files(self) -> None:
        ends: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for rel, end in sorted(ends.items()):
            path = self.directory / rel
            if not path.is_file():
                raise CheckpointFileError(f"{path}: checkpoint data file missing")
            if path.stat().st_size < end:
                raise CheckpointFileError(f"{path}: truncated ({path.stat().st_size} bytes, metadata needs {end})")

    def tensor_keys(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]

    def object_keys(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]

    def __contains__(self, key: str) -> bool:
        return isinstance(self.metadata.state_dict_metadata.get(key), TensorStorageMetadata)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._md(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._md(key).properties.dtype

    def chunks(self, key: str) -> list[ChunkStorageMetadata]:
        return list(self._md(key).chunks)

    def _md(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"{self.directory}: no tensor {key!r} in the checkpoint")
        return md

    def _load_chunk(self, key: str, chunk: ChunkStorageMetadata) -> torch.Tensor:
        info = self.metadata.storage_data.get(MetadataIndex(key, chunk.offsets))
        if info is None:
            raise CheckpointFileError(f"{self.directory / '.metadata'}: no storage entry for {key} at {tuple(chunk.offsets)}")
        path = self.directory / info.relative_path
        if info.transform_descriptors:
            raise CheckpointFileError(f"{path}: stored with transforms {info.transform_descriptors}, not supported")
        try:
            with open(path, "rb") as f:
                tensor = torch.load(_FileSlice(f, info.offset, info.length), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated / corrupt data
            raise CheckpointFileError(f"{path}: cannot read {key} chunk at {tuple(chunk.offsets)} ({e})") from None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(chunk.sizes):
            raise CheckpointFileError(f"{path}: {key} chunk at {tuple(chunk.offsets)} does not hold a "
                                      f"{tuple(chunk.sizes)} tensor")
        return tensor

    def _read_region(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        pieces = []
        for chunk in self._md(key).chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [min(o + s, c + cs) for o, s, c, cs in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if all(a < b for a, b in zip(lo, hi)):
                pieces.append((chunk, lo, hi))
        if len(pieces) == 1 and tuple(pieces[0][0].offsets) == offsets and tuple(pieces[0][0].sizes) == sizes:
            return self._load_chunk(key, pieces[0][0])  # the region is one stored chunk: no copy
        target = torch.empty(sizes, dtype=self.dtype(key))
        covered = 0
        for chunk, lo, hi in pieces:
            src, dst = self._load_chunk(key, chunk), target
            for dim, (a, b) in enumerate(zip(lo, hi)):
                src = src.narrow(dim, a - chunk.offsets[dim], b - a)
                dst = dst.narrow(dim, a - offsets[dim], b - a)
            dst.copy_(src)
            covered += int(torch.Size([b - a for a, b in zip(lo, hi)]).numel())
            del src
        if covered != int(torch.Size(sizes).numel()):
            raise CheckpointFileError(f"{self.directory}: stored chunks of {key} do not cover {offsets}+{sizes}")
        return target

    def read_many(self, regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        """Read {key: (offsets, sizes)} regions into tensors of the stored dtype (loading each stored chunk
        that overlaps a region once; a region equal to one stored chunk is returned without a copy)."""
        out = {}
        for key, (offsets, sizes) in regions.items():
            shape = self.shape(key)
            offsets, sizes = tuple(offsets), tuple(sizes)
            if len(offsets) != len(shape) or len(sizes) != len(shape) or \
                    any(o < 0 or o + s > g for o, s, g in zip(offsets, sizes, shape)):
                raise ValueError(f"{key}: region {offsets}+{sizes} outside the global shape {shape}")
            out[key] = self._read_region(key, offsets, sizes)
        return out

    def read(self, key: str, offsets: tuple[int, ...] | None = None, sizes: tuple[int, ...] | None = None
             ) -> torch.Tensor:
        """Read a region of one tensor (the whole tensor by default)."""
        shape = self.shape(key)
        offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
        sizes = tuple(sizes) if sizes is not None else tuple(g - o for g, o in zip(shape, offsets))
        return self.read_many({key: (offsets, sizes)})[key]
