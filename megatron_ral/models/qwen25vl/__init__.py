"""Qwen2.5-VL on megatron-core.

    rope_index   M-RoPE position ids and decode deltas (pure torch)
    vision       frozen HF vision tower + merger, encode once / reuse, merge into embeddings
    layer_specs  local (torch) and Transformer-Engine layer specs; last-layer core attention slot
    attention_layout  training layouts as data (plain, packed sequences, shared-prompt groups; CP split)
    core_attention    the local spec's core attention for plain, packed and context-parallel input
    context_parallel  a CP rank's share of a sequence and the collectives that join the shares
    capture      core attention with a capture hook (post-RoPE Q/K of the last layer)
    provider     HF config.json -> TransformerConfig -> Qwen25VLModel of this pipeline stage
    model        Qwen25VLModel (vision_model + language_model GPTModel)
    hf_config    the language-model facts of an HF config object (LMArchitecture, padded vocabulary)
    arch         the shape facts of a config.json (what the converters and tools check without torch)
    mapping      parameter names and QKV / fc1 layouts, HF <-> Megatron-Core (the converters use it)
    hf_weights   in-memory HF -> megatron weights for one rank

Names are imported lazily so that ``rope_index`` stays usable without megatron-core.
"""

import importlib

_EXPORTS = {
    "RopeIndexConfig": "rope_index",
    "get_rope_index": "rope_index",
    "decode_position_ids": "rope_index",
    "VisionEmbeddings": "vision",
    "repeat_vision_embeddings": "vision",
    "build_model": "provider",
    "load_hf_config": "provider",
    "transformer_config_from_hf": "provider",
    "padded_vocab_size": "provider",
    "Qwen25VLModel": "model",
    "AttentionLayout": "attention_layout",
    "LayoutParams": "core_attention",
    "LocalCoreAttention": "core_attention",
    "load_hf_weights": "hf_weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
