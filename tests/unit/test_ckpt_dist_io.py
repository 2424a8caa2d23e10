"""torch_dist files written chunk by chunk: PyTorch DCP's own loader reads them, and region reads are exact."""

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_ral.checkpoint.dist_ckpt_io import (
    BytesSpec,
    ChunkSpec,
    DistCheckpointReader,
    TensorSpec,
    none_object_bytes,
    write_dist_checkpoint,
)
from megatron_ral.checkpoint.safetensors_io import CheckpointFileError


def _chunked(key, full, row_cuts, col_cuts):
    """A TensorSpec storing `full` as an irregular grid of chunks."""
    spec = TensorSpec(key, tuple(full.shape), full.dtype)
    rows = list(zip(row_cuts[:-1], row_cuts[1:]))
    cols = list(zip(col_cuts[:-1], col_cuts[1:]))
    for r0, r1 in rows:
        for c0, c1 in cols:
            spec.chunks.append(ChunkSpec((r0, c0), (r1 - r0, c1 - c0),
                                         lambda a=r0, b=r1, c=c0, d=c1: full[a:b, c:d].clone()))
    return spec


@pytest.fixture
def written(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 7, generator=g)
    b = torch.randn(3, 4, 5, generator=g).to(torch.bfloat16)
    c = torch.tensor(2.5)
    specs = [
        _chunked("a", a, [0, 3, 4, 10], [0, 5, 7]),
        TensorSpec("b", (3, 4, 5), torch.bfloat16,
                   [ChunkSpec((i, 0, 0), (1, 4, 5), lambda i=i: b[i:i + 1].clone(), order=(-i,)) for i in range(3)]),
        TensorSpec("c", (), torch.float32, [ChunkSpec((), (), lambda: c.clone())]),
    ]
    write_dist_checkpoint(tmp_path, specs, [BytesSpec("obj/shard_0_1", none_object_bytes)])
    return tmp_path, {"a": a, "b": b, "c": c}


def test_pytorch_dcp_loads_what_we_write(written):
    path, ref = written
    state = {k: torch.zeros_like(v) for k, v in ref.items()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    for name in (".metadata", "metadata.json", "common.pt", "__0_0.distcp"):
        assert (path / name).is_file()


def test_region_reads(written):
    path, ref = written
    reader = DistCheckpointReader(path)
    assert reader.shape("a") == (10, 7) and reader.dtype("b") == torch.bfloat16
    assert reader.object_keys() == ["obj/shard_0_1"]
    assert torch.equal(reader.read("a"), ref["a"])
    for off, size in [((2, 1), (5, 6)), ((0, 5), (10, 2)), ((3, 0), (1, 5)), ((9, 6), (1, 1))]:
        got = reader.read("a", off, size)
        assert torch.equal(got, ref["a"][off[0]:off[0] + size[0], off[1]:off[1] + size[1]]), off
    assert torch.equal(reader.read("b", (1, 0, 0), (1, 4, 5)), ref["b"][1:2])
    assert torch.equal(reader.read("b", (0, 2, 1), (3, 2, 3)), ref["b"][:, 2:4, 1:4])
    assert torch.equal(reader.read("c"), ref["c"])
    with pytest.raises(ValueError, match="outside"):
        reader.read("a", (8, 0), (3, 7))


def test_overlapping_chunks_are_rejected(tmp_path):
    full = torch.zeros(4, 2)
    spec = TensorSpec("a", (4, 2), torch.float32, [ChunkSpec((0, 0), (3, 2), lambda: full[:3].clone()),
                                                   ChunkSpec((2, 0), (2, 2), lambda: full[2:].clone())])
    with pytest.raises(ValueError, match="tile"):
        write_dist_checkpoint(tmp_path, [spec], [])


def test_truncated_or_missing_data_file(written):
    path, _ = written
    data = path / "__0_0.distcp"
    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointFileError, match="__0_0.distcp.*truncated"):
        DistCheckpointReader(path)
    data.unlink()
    with pytest.raises(CheckpointFileError, match="__0_0.distcp.*missing"):
        DistCheckpointReader(path)
