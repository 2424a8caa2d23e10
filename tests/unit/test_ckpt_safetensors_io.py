"""Streaming safetensors IO against the safetensors library as the reference."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ral.checkpoint.safetensors_io import (
    INDEX_NAME,
    CheckpointFileError,
    HFCheckpointReader,
    TensorPlan,
    write_sharded,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(11, generator=g),
        "c.ids": torch.randint(-5, 5, (3, 2, 2), generator=g, dtype=torch.int64),
        "d.mask": torch.rand(6, generator=g) > 0.5,
        "e.half": torch.randn(4, 4, generator=g).half(),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 3),
    }


@pytest.mark.parametrize("max_shard_bytes", [10**9, 64])
def test_written_shards_load_with_safetensors(tmp_path, max_shard_bytes):
    ts = _tensors()
    plans = [TensorPlan(n, t.dtype, tuple(t.shape)) for n, t in ts.items()]
    files = write_sharded(tmp_path, plans, ts.items(), max_shard_bytes=max_shard_bytes)
    loaded = {}
    for f in files:
        loaded.update(load_file(str(tmp_path / f)))
    assert loaded.keys() == ts.keys()
    for n, t in ts.items():
        assert loaded[n].dtype == t.dtype and torch.equal(loaded[n], t), n
    if len(files) > 1:
        index = json.loads((tmp_path / INDEX_NAME).read_text())
        assert set(index["weight_map"]) == set(ts) and set(index["weight_map"].values()) == set(files)
        assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    else:
        assert files == ["model.safetensors"] and not (tmp_path / INDEX_NAME).exists()
    reader = HFCheckpointReader(tmp_path)
    for n, t in ts.items():
        assert torch.equal(reader.get(n), t)


def test_row_blocks_and_row_reads(tmp_path):
    t = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    plans = [TensorPlan("x", t.dtype, (10, 4)), TensorPlan("y", torch.int32, (2,))]
    blocks = [("x", t[:3]), ("x", t[3:9]), ("x", t[9:]), ("y", torch.tensor([1, 2], dtype=torch.int32))]
    write_sharded(tmp_path, plans, blocks)
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["x"], t)
    reader = HFCheckpointReader(tmp_path)
    assert torch.equal(reader.get("x", (2, 7)), t[2:7])


def test_writer_rejects_wrong_order_dtype_and_missing(tmp_path):
    plans = [TensorPlan("x", torch.float32, (2,)), TensorPlan("y", torch.float32, (2,))]
    with pytest.raises(RuntimeError, match="expected tensor 'x'"):
        write_sharded(tmp_path / "a", plans, [("y", torch.zeros(2))])
    with pytest.raises(RuntimeError, match="dtype"):
        write_sharded(tmp_path / "b", plans, [("x", torch.zeros(2, dtype=torch.float64))])
    with pytest.raises(RuntimeError, match="not written"):
        write_sharded(tmp_path / "c", plans, [("x", torch.zeros(2))])


def _hf_sharded(tmp_path):
    ts = _tensors()
    names = list(ts)
    save_file({n: ts[n] for n in names[:3]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({n: ts[n] for n in names[3:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    wm = {n: f"model-0000{1 if i < 3 else 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return ts


def test_reads_hf_sharded_checkpoint(tmp_path):
    ts = _hf_sharded(tmp_path)
    reader = HFCheckpointReader(tmp_path)
    got = dict(reader.iter_tensors())
    assert got.keys() == ts.keys() and all(torch.equal(got[n], ts[n]) for n in ts)


def test_missing_shard_names_the_file(tmp_path):
    _hf_sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointFileError, match="model-00002-of-00002.safetensors.*not found"):
        HFCheckpointReader(tmp_path)


def test_truncated_shard_names_the_file(tmp_path):
    _hf_sharded(tmp_path)
    path = tmp_path / "model-00001-of-00002.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(CheckpointFileError, match="model-00001-of-00002.safetensors.*truncated"):
        HFCheckpointReader(tmp_path)
    path.write_bytes(data[:6])
    with pytest.raises(CheckpointFileError, match="model-00001-of-00002.safetensors.*truncated"):
        HFCheckpointReader(tmp_path)


def test_corrupt_header_names_the_file(tmp_path):
    _hf_sharded(tmp_path)
    path = tmp_path / "model-00002-of-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFileError, match="model-00002-of-00002.safetensors.*corrupt"):
        HFCheckpointReader(tmp_path)


def test_index_entry_not_in_shard(tmp_path):
    _hf_sharded(tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"]["a.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match="does not contain 'a.weight'"):
        HFCheckpointReader(tmp_path)
