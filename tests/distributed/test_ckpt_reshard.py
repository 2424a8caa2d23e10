"""Converted checkpoints against the real Qwen25VLModel: the layout is the model's own sharded_state_dict,
it loads at TP=1 with HF-identical logits, and HF -> Megatron -> load at TP2xPP2 -> save -> HF is bit-exact."""

from __future__ import annotations

import pytest
import torch

from megatron_ral.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_ral.checkpoint.safetensors_io import HFCheckpointReader
from megatron_ral.tiny.checkpoint import make_tiny_checkpoint
from megatron_ral.config.schema import ParallelConfig
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed


def _build(hf_dir: str, tp: int = 1, pp: int = 1, split=None):
    from megatron_ral.models.qwen25vl.provider import build_model
    from megatron_ral.platform import initialize

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              pipeline_layer_split=split)
    initialize(parallel, seed=5)
    return build_model(hf_dir, parallel, backend="local", dtype=torch.float32, last_layer_core_attention=None)


def _load(model, ckpt: str) -> None:
    from megatron_ral.checkpoint.model_io import load_model_weights

    load_model_weights(model, ckpt)


def _layout_and_logits(hf_dir: str, ckpt: str) -> dict:
    """TP=1: the model's sharded_state_dict layout, and logits after loading the converted checkpoint."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from megatron_ral.testing.models import make_prompt

    model = _build(hf_dir).eval()
    tensors, objects = {}, set()
    for sh in nested_values(model.sharded_state_dict()):
        if isinstance(sh, ShardedTensorFactory):
            sh = sh.build()[0]  # fc1: its gate half carries the global shape of [gate; up]
            tensors[sh.key] = (tuple(sh.global_shape), sh.data.dtype)
        elif isinstance(sh, ShardedTensor):
            tensors[sh.key] = (tuple(sh.global_shape), sh.data.dtype)
        elif isinstance(sh, ShardedObject):
            objects.add(sh.unique_key)
    _load(model, ckpt)
    prompt = make_prompt([5, ("image", (1, 4, 4)), 4, ("video", (2, 4, 6)), 3], seed=1,
                         second_per_grid_ts=[0.5])
    with torch.no_grad():
        logits = model(**prompt.model_inputs(), runtime_gather_output=True)
    return {"tensors": tensors, "objects": objects, "logits": logits, "inputs": prompt}


def _reshard_and_save(hf_dir: str, ckpt: str, out: str, tp: int, pp: int, split) -> None:
    from megatron_ral.checkpoint.model_io import save_model_weights

    model = _build(hf_dir, tp, pp, split)
    _load(model, ckpt)
    save_model_weights(model, out, hf_dir=hf_dir)


CHECKPOINTS = {
    # GQA 2:1, untied, 3 layers
    "tiny": dict(preset="tiny", config_overrides=None),
    # GQA 4:1, tied embeddings, vocabulary 1030 (the model pads it to 1152 rows)
    "small-tied-padded": dict(preset="small", config_overrides={
        "text_config": {"num_hidden_layers": 2, "vocab_size": 1030},
        "vision_config": {"depth": 2, "fullatt_block_indexes": [1]}}),
}


def _convert(root, name):
    hf = make_tiny_checkpoint(root / f"hf-{name}", seed=11, **CHECKPOINTS[name])
    hf_to_megatron(hf, root / f"mcore-{name}", progress=False, max_chunk_bytes=40_000)
    return root / f"mcore-{name}", hf


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_layout_matches_model_and_logits_match_hf(tmp_path, name):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_ral.testing.models import hf_reference_model

    ckpt, hf = _convert(tmp_path, name)
    (out,) = run_distributed(_layout_and_logits, 1, str(hf), str(ckpt))
    md = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    written = {k: (tuple(v.size), v.properties.dtype) for k, v in md.items() if not isinstance(v, BytesStorageMetadata)}
    assert written == out["tensors"]
    assert {k for k, v in md.items() if isinstance(v, BytesStorageMetadata)} == out["objects"]

    from transformers import AutoConfig

    state = dict(HFCheckpointReader(hf).iter_tensors())
    ref = hf_reference_model(AutoConfig.from_pretrained(str(hf)), state)
    prompt = out["inputs"]
    with torch.no_grad():
        expected = ref(**prompt.hf_inputs(ref.config.image_token_id, ref.config.video_token_id)).logits
    vocab = expected.shape[-1]
    scale = expected.abs().max()
    assert (out["logits"][..., :vocab] - expected).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("name,split", [("tiny", [1, 2]), ("small-tied-padded", None)])
def test_reshard_tp2_pp2_round_trip_bit_exact(tmp_path, name, split):
    ckpt, hf = _convert(tmp_path, name)
    saved = tmp_path / "saved_tp2pp2"
    run_distributed(_reshard_and_save, 4, str(hf), str(ckpt), str(saved), 2, 2, split)
    back = tmp_path / "hf_back"
    megatron_to_hf(saved, back, progress=False)  # the saved checkpoint carries the HF config files
    a, b = HFCheckpointReader(hf), HFCheckpointReader(back)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name


def _logits_after_load(hf_dir: str, ckpt: str) -> torch.Tensor:
    from megatron_ral.testing.models import make_prompt

    model = _build(hf_dir).eval()
    _load(model, ckpt)
    prompt = make_prompt([6, ("image", (1, 4, 4)), 3], seed=2)
    with torch.no_grad():
        return model(**prompt.model_inputs(), runtime_gather_output=True)


def test_checkpoint_without_extra_state_objects_loads(tmp_path):
    """A checkpoint written by another layer spec may lack some ``_extra_state`` objects; weights still load."""
    from megatron_ral.checkpoint.dist_ckpt_io import ChunkSpec, DistCheckpointReader, TensorSpec, write_dist_checkpoint

    ckpt, hf = _convert(tmp_path, "tiny")
    reader = DistCheckpointReader(ckpt)
    assert reader.object_keys()
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    specs = [TensorSpec(k, reader.shape(k), reader.dtype(k),
                        [ChunkSpec((0,) * len(reader.shape(k)), reader.shape(k), lambda k=k: reader.read(k))])
             for k in reader.tensor_keys()]
    write_dist_checkpoint(stripped, specs, [])
    full, part = (run_distributed(_logits_after_load, 1, str(hf), str(p))[0] for p in (ckpt, stripped))
    assert torch.equal(full, part)
