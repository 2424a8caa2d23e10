"""HF -> Megatron -> HF conversion: bit-exact round trips, accepted namings, clear failures, no partial output."""

import json
import shutil

import pytest
import torch

from megatron_ral.models.qwen25vl import mapping as M
from megatron_ral.checkpoint.convert import (
    CheckpointMismatchError,
    hf_to_megatron,
    megatron_to_hf,
    resolve_dist_dir,
)
from megatron_ral.checkpoint.dist_ckpt_io import ChunkSpec, DistCheckpointReader, TensorSpec, write_dist_checkpoint
from megatron_ral.checkpoint.output_dir import atomic_output_dir
from megatron_ral.models.qwen25vl.arch import UnsupportedCheckpointError
from megatron_ral.checkpoint.safetensors_io import (
    CheckpointFileError,
    HFCheckpointReader,
    TensorPlan,
    write_sharded,
)
from megatron_ral.tiny.checkpoint import make_tiny_checkpoint

SMALL_BF16 = {"text_config": {"num_hidden_layers": 2}, "vision_config": {"depth": 2, "fullatt_block_indexes": [1]},
              "dtype": "bfloat16"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", preset="tiny", seed=3)


def _assert_bit_exact(a_dir, b_dir):
    a, b = HFCheckpointReader(a_dir), HFCheckpointReader(b_dir)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        x, y = a.get(name), b.get(name)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_round_trip_bit_exact_and_loadable(tiny, tmp_path):
    hf_to_megatron(tiny, tmp_path / "mc", max_chunk_bytes=30_000, progress=False)
    # row-blocked embedding and output layer
    reader = DistCheckpointReader(tmp_path / "mc")
    assert len(reader.chunks(M.LM_PREFIX + M.EMBEDDING)) > 1
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "video_preprocessor_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "mc" / name).is_file(), name
    megatron_to_hf(tmp_path / "mc", tmp_path / "back", max_shard_bytes=200_000, progress=False)
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    _assert_bit_exact(tiny, tmp_path / "back")

    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    ids = torch.tensor([[1, 5, 9, 200, 3]])
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny))
    got = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "back"))
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, got(input_ids=ids).logits)
    AutoProcessor.from_pretrained(str(tmp_path / "back"))


def test_bf16_tied_round_trip(tmp_path):
    hf = make_tiny_checkpoint(tmp_path / "hf", preset="small", seed=1, config_overrides=SMALL_BF16)
    hf_to_megatron(hf, tmp_path / "mc", progress=False)
    reader = DistCheckpointReader(tmp_path / "mc")
    assert M.LM_PREFIX + M.OUTPUT_LAYER not in reader
    assert reader.dtype(M.LM_PREFIX + M.LAYERS + M.QKV_W) == torch.bfloat16
    megatron_to_hf(tmp_path / "mc", tmp_path / "back", progress=False)
    _assert_bit_exact(hf, tmp_path / "back")
    assert "lm_head.weight" not in HFCheckpointReader(tmp_path / "back").names()


def test_megatron_tensors_hold_the_documented_layout(tiny, tmp_path):
    hf_to_megatron(tiny, tmp_path / "mc", progress=False)
    reader, src = DistCheckpointReader(tmp_path / "mc"), HFCheckpointReader(tiny)
    cfg = json.loads((tiny / "config.json").read_text())["text_config"]
    layer = 2
    qkv = reader.read(M.LM_PREFIX + M.LAYERS + M.QKV_W, (layer, 0, 0), (1, *reader.shape(M.LM_PREFIX + M.LAYERS + M.QKV_W)[1:]))[0]
    h = f"model.layers.{layer}.self_attn."
    expected = M.qkv_to_megatron(src.get(h + "q_proj.weight"), src.get(h + "k_proj.weight"),
                                 src.get(h + "v_proj.weight"), cfg["num_key_value_heads"])
    assert torch.equal(qkv, expected)
    fc1 = reader.read(M.LM_PREFIX + M.LAYERS + M.FC1_W)
    F = cfg["intermediate_size"]
    assert torch.equal(fc1[layer, :F], src.get(f"model.layers.{layer}.mlp.gate_proj.weight"))
    assert torch.equal(fc1[layer, F:], src.get(f"model.layers.{layer}.mlp.up_proj.weight"))
    norm = reader.read(M.LM_PREFIX + M.LAYERS + M.FC1_NORM)
    assert torch.equal(norm[1], src.get("model.layers.1.post_attention_layernorm.weight"))
    assert torch.equal(reader.read("vision_model.blocks.1.attn.qkv.bias"), src.get("visual.blocks.1.attn.qkv.bias"))


def test_transformers5_in_memory_naming_is_accepted(tiny, tmp_path):
    src = HFCheckpointReader(tiny)

    def renamed(n):
        return ("model.language_model." + n[6:]) if n.startswith("model.") else \
            ("model." + n if n.startswith("visual.") else n)

    hf = tmp_path / "hf5"
    names = src.names()
    plans = [TensorPlan(renamed(n), src.info(n).dtype, src.info(n).shape) for n in names]
    write_sharded(hf, plans, ((renamed(n), src.get(n)) for n in names), max_shard_bytes=150_000)
    shutil.copy(tiny / "config.json", hf / "config.json")
    hf_to_megatron(hf, tmp_path / "mc", progress=False)
    megatron_to_hf(tmp_path / "mc", tmp_path / "back", progress=False)
    _assert_bit_exact(tiny, tmp_path / "back")  # written back in the released naming


def _rewrite(src_dir, dst_dir, rename):
    """Copy a dist checkpoint, renaming/splitting keys: rename(key, tensor) -> [(new_key, tensor)]."""
    reader = DistCheckpointReader(src_dir)
    specs = []
    for key in reader.tensor_keys():
        for new_key, t in rename(key, reader.read(key)):
            specs.append(TensorSpec(new_key, tuple(t.shape), t.dtype,
                                    [ChunkSpec((0,) * t.dim(), tuple(t.shape), lambda t=t: t)]))
    dst_dir.mkdir()
    write_dist_checkpoint(dst_dir, specs, [])
    shutil.copy(src_dir / "config.json", dst_dir / "config.json")


def test_local_norm_names_and_per_layer_keys_are_read(tiny, tmp_path):
    hf_to_megatron(tiny, tmp_path / "mc", progress=False)

    def local_names(key, t):
        key = key.replace(M.LAYERS + M.QKV_NORM, M.LAYERS + "input_layernorm.weight")
        return [(key.replace(M.LAYERS + M.FC1_NORM, M.LAYERS + "pre_mlp_layernorm.weight"), t)]

    def per_layer(key, t):
        if key.startswith(M.LM_PREFIX + M.LAYERS):
            kind = key[len(M.LM_PREFIX + M.LAYERS):]
            return [(f"{M.LM_PREFIX}{M.LAYERS}{i}.{kind}", t[i].clone()) for i in range(t.shape[0])]
        return [(key, t)]

    for name, fn in (("local", local_names), ("per_layer", per_layer)):
        _rewrite(tmp_path / "mc", tmp_path / name, fn)
        megatron_to_hf(tmp_path / name, tmp_path / f"back_{name}", progress=False)
        _assert_bit_exact(tiny, tmp_path / f"back_{name}")


def test_unsupported_architecture_fails_cleanly(tiny, tmp_path):
    hf = tmp_path / "llama"
    shutil.copytree(tiny, hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedCheckpointError, match="unsupported architecture.*llama"):
        hf_to_megatron(hf, tmp_path / "out", progress=False)
    assert _siblings(tmp_path / "out") == ["llama"]


def test_truncated_shard_fails_naming_file_without_output(tiny, tmp_path):
    hf = tmp_path / "sharded"
    src = HFCheckpointReader(tiny)
    names = src.names()
    write_sharded(hf, [TensorPlan(n, src.info(n).dtype, src.info(n).shape) for n in names],
                  ((n, src.get(n)) for n in names), max_shard_bytes=150_000)
    shutil.copy(tiny / "config.json", hf / "config.json")
    shards = sorted(hf.glob("model-*.safetensors"))
    assert len(shards) >= 3
    victim = shards[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CheckpointFileError, match=f"{victim.name}.*truncated"):
        hf_to_megatron(hf, tmp_path / "out", progress=False)
    victim.unlink()
    with pytest.raises(CheckpointFileError, match=f"{victim.name}.*not found"):
        hf_to_megatron(hf, tmp_path / "out", progress=False)
    assert _siblings(tmp_path / "out") == ["sharded"]


def test_megatron_side_failures(tiny, tmp_path):
    hf_to_megatron(tiny, tmp_path / "mc", progress=False)
    # wrong config: layer count differs from the checkpoint
    other = tmp_path / "cfg"
    other.mkdir()
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 4
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="global shape"):
        megatron_to_hf(tmp_path / "mc", tmp_path / "out", hf_config=other, progress=False)
    # truncated data file
    data = next((tmp_path / "mc").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(CheckpointFileError, match=f"{data.name}.*truncated"):
        megatron_to_hf(tmp_path / "mc", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # no config next to a checkpoint
    (tmp_path / "mc" / "config.json").unlink()
    with pytest.raises(UnsupportedCheckpointError, match="--hf-config"):
        megatron_to_hf(tmp_path / "mc", tmp_path / "out", progress=False)


def test_existing_output_needs_overwrite(tiny, tmp_path):
    (tmp_path / "mc").mkdir()
    (tmp_path / "mc" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        hf_to_megatron(tiny, tmp_path / "mc", progress=False)
    hf_to_megatron(tiny, tmp_path / "mc", overwrite=True, progress=False)
    assert not (tmp_path / "mc" / "keep.txt").exists() and (tmp_path / "mc" / ".metadata").is_file()


def test_atomic_output_dir_removes_partial_output(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_resolve_run_directory(tiny, tmp_path):
    run = tmp_path / "run"
    hf_to_megatron(tiny, run / "iter_0000002", progress=False)
    hf_to_megatron(tiny, run / "iter_0000010", progress=False)
    assert resolve_dist_dir(run) == run / "iter_0000010"
    (run / "latest_checkpointed_iteration.txt").write_text("2\n")
    assert resolve_dist_dir(run) == run / "iter_0000002"
    with pytest.raises(CheckpointFileError, match="not a megatron torch_dist checkpoint"):
        resolve_dist_dir(tiny)
