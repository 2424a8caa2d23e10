"""Random HF Qwen2.5-VL checkpoints with the real model shapes (for benchmarks), written with bounded memory,
and a streaming bit-exact comparison of two HF checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_ral.checkpoint.safetensors_io import HFCheckpointReader, TensorPlan, write_sharded

_REAL_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                "fullatt_block_indexes": [7, 15, 23, 31]}
_REAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
             "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}

# Released Qwen2.5-VL shapes (config overrides on top of a preset).
REAL_SHAPES: dict[str, dict] = {
    "qwen2.5-vl-3b": {
        "text_config": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                        "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                        "max_position_embeddings": 128000, "mrope_section": [16, 24, 24]},
        "vision_config": dict(_REAL_VISION, out_hidden_size=2048),
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    },
    "qwen2.5-vl-7b": {
        "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                        "max_position_embeddings": 128000, "mrope_section": [16, 24, 24]},
        "vision_config": dict(_REAL_VISION, out_hidden_size=3584),
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    },
}


def real_shape_config(shape: str):
    from megatron_ral.tiny.checkpoint import build_config

    if shape not in REAL_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(REAL_SHAPES)}")
    return build_config("tiny", REAL_SHAPES[shape], token_ids=_REAL_IDS)


def tensor_plans(config) -> list[TensorPlan]:
    """Released-naming tensor list of `config` (lm_head absent when tied), from a meta-device model."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_ral.models.qwen25vl.mapping import canonical_hf_name

    dtype = getattr(torch, str(config.dtype).replace("torch.", ""))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    plans = []
    for name, t in model.state_dict().items():
        name = canonical_hf_name(name)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        plans.append(TensorPlan(name, dtype, tuple(t.shape)))
    return plans


def write_random_hf_checkpoint(out_dir: str | os.PathLike, shape: str, seed: int = 0,
                               max_shard_bytes: int = 4 * 1024**3, block_bytes: int = 64 * 1024**2) -> int:
    """Write config.json + sharded safetensors of random N(0, 0.02) weights; returns the bytes of weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = real_shape_config(shape)
    plans = tensor_plans(config)
    gen = torch.Generator().manual_seed(seed)

    def blocks():
        for p in plans:
            rows = p.shape[0] if p.shape else 1
            row_bytes = max(1, p.nbytes // max(rows, 1))
            step = max(1, block_bytes // row_bytes)
            for a in range(0, rows, step):
                b = min(rows, a + step)
                shape = (b - a, *p.shape[1:]) if p.shape else ()
                yield p.name, (torch.randn(shape, generator=gen) * 0.02).to(p.dtype)

    write_sharded(out, plans, blocks(), max_shard_bytes=max_shard_bytes)
    config.save_pretrained(str(out))
    return sum(p.nbytes for p in plans)


def first_difference(a_dir: str | os.PathLike, b_dir: str | os.PathLike) -> str | None:
    """None if both HF checkpoints hold the same tensor names, dtypes, shapes and bytes; else a description."""
    a, b = HFCheckpointReader(a_dir), HFCheckpointReader(b_dir)
    if sorted(a.names()) != sorted(b.names()):
        return f"names differ: {sorted(set(a.names()) ^ set(b.names()))[:5]}"
    for name in a.names():
        x, y = a.get(name), b.get(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{name}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return f"{name}: values differ"
    return None
