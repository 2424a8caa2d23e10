"""Qwen2.5-VL parameter names and layouts: Hugging Face <-> Megatron-Core.

Names
-----
HF (released checkpoints)                    Megatron-Core sharded key (prefix ``language_model.``)
model.embed_tokens.weight                    embedding.word_embeddings.weight
model.layers.L.input_layernorm.weight        decoder.layers.self_attention.linear_qkv.layer_norm_weight  [L]
model.layers.L.self_attn.{q,k,v}_proj.*      decoder.layers.self_attention.linear_qkv.{weight,bias}      [L]
model.layers.L.self_attn.o_proj.weight       decoder.layers.self_attention.linear_proj.weight            [L]
model.layers.L.post_attention_layernorm.w    decoder.layers.mlp.linear_fc1.layer_norm_weight             [L]
model.layers.L.mlp.{gate,up}_proj.weight     decoder.layers.mlp.linear_fc1.weight                        [L]
model.layers.L.mlp.down_proj.weight          decoder.layers.mlp.linear_fc2.weight                        [L]
model.norm.weight                            decoder.final_layernorm.weight
lm_head.weight                               output_layer.weight           (absent with tied embeddings)
visual.<rest>                                vision_model.<rest>           (prefix only, no ``language_model.``)

``[L]``: megatron-core stacks the decoder layers of a GPTModel in its sharded state dict: one key per
parameter kind with a leading layer axis of length num_layers (global layer index), each layer one
chunk. The local layer spec maps its norm names to the Transformer-Engine ones above
(``input_layernorm.`` -> ``self_attention.linear_qkv.layer_norm_``, ``pre_mlp_layernorm.`` ->
``mlp.linear_fc1.layer_norm_``); the local names are accepted on read.

Layouts
-------
QKV (weight rows and bias entries), per query group g of G = num_query_groups, h = heads per group,
d = head_dim:  [q_{g*h} .. q_{g*h+h-1} (h*d rows), k_g (d rows), v_g (d rows)] for g = 0..G-1.

fc1: [gate; up] concatenated along rows (the global tensor of megatron's SwiGLU sharded factory, which
stores the gate half of TP rank r at fragment r and the up half at fragment r + TP of 2*TP).
"""

from __future__ import annotations

import torch

from megatron_ral.models.qwen25vl.arch import Qwen25VLArch

LM_PREFIX = "language_model."
VISION_PREFIX = "vision_model."
HF_VISION_PREFIX = "visual."

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
LAYERS = "decoder.layers."

# Layer parameter kinds (megatron suffix after "decoder.layers.").
QKV_NORM = "self_attention.linear_qkv.layer_norm_weight"
QKV_W = "self_attention.linear_qkv.weight"
QKV_B = "self_attention.linear_qkv.bias"
PROJ_W = "self_attention.linear_proj.weight"
FC1_NORM = "mlp.linear_fc1.layer_norm_weight"
FC1_W = "mlp.linear_fc1.weight"
FC2_W = "mlp.linear_fc2.weight"
LAYER_KINDS = (QKV_NORM, QKV_W, QKV_B, PROJ_W, FC1_NORM, FC1_W, FC2_W)

# Local-spec names of the two norms, accepted on read.
LOCAL_NORM_NAMES = {QKV_NORM: "input_layernorm.weight", FC1_NORM: "pre_mlp_layernorm.weight"}

# Linear modules of a layer that carry an ``_extra_state`` object in the sharded state dict.
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
                       "mlp.linear_fc2")

# HF names of one decoder layer, in the order they are written.
HF_LAYER_NAMES = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)

# HF names of one vision block and of the vision tower's other parts (after "visual.").
HF_VISION_BLOCK_NAMES = (
    "norm1.weight", "norm2.weight",
    "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias",
    "mlp.down_proj.weight", "mlp.down_proj.bias",
)
HF_VISION_HEAD_NAMES = ("patch_embed.proj.weight",)
HF_VISION_TAIL_NAMES = ("merger.ln_q.weight", "merger.mlp.0.weight", "merger.mlp.0.bias",
                        "merger.mlp.2.weight", "merger.mlp.2.bias")


def hf_layer(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}"


def canonical_hf_name(name: str) -> str:
    """Released naming of an HF key; the transformers-5 in-memory naming is mapped onto it."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return HF_VISION_PREFIX + name[len("model.visual."):]
    return name


def hf_vision_names(arch: Qwen25VLArch) -> list[str]:
    """Released HF names of the vision tower and merger, in write order."""
    names = [HF_VISION_PREFIX + n for n in HF_VISION_HEAD_NAMES]
    for b in range(arch.vision_depth):
        names += [f"{HF_VISION_PREFIX}blocks.{b}.{n}" for n in HF_VISION_BLOCK_NAMES]
    names += [HF_VISION_PREFIX + n for n in HF_VISION_TAIL_NAMES]
    return names


def hf_names(arch: Qwen25VLArch) -> list[str]:
    """Every released HF name of the model, in write order (lm_head absent when tied)."""
    names = ["model.embed_tokens.weight"]
    for layer in range(arch.num_layers):
        names += [hf_layer(layer, n) for n in HF_LAYER_NAMES]
    names.append("model.norm.weight")
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    return names + hf_vision_names(arch)


def hf_lm_shapes(arch: Qwen25VLArch) -> dict[str, tuple[int, ...]]:
    """Expected shapes of the language-model HF tensors (vision shapes are passed through unchecked)."""
    H, F, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (q, H), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, H), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, H), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (H, q),
        "post_attention_layernorm.weight": (H,),
        "mlp.gate_proj.weight": (F, H), "mlp.up_proj.weight": (F, H), "mlp.down_proj.weight": (H, F),
    }
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, H), "model.norm.weight": (H,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, H)
    for layer in range(arch.num_layers):
        shapes.update({hf_layer(layer, n): s for n, s in per_layer.items()})
    return shapes


def megatron_layer_shapes(arch: Qwen25VLArch) -> dict[str, tuple[int, ...]]:
    """Per-layer (unstacked) shapes of the megatron layer parameter kinds."""
    H, F = arch.hidden_size, arch.ffn_hidden_size
    return {
        QKV_NORM: (H,),
        QKV_W: (arch.qkv_rows, H),
        QKV_B: (arch.qkv_rows,),
        PROJ_W: (H, arch.num_attention_heads * arch.head_dim),
        FC1_NORM: (H,),
        FC1_W: (2 * F, H),
        FC2_W: (H, F),
    }


def vision_megatron_key(hf_name: str) -> str:
    """Megatron key of a released HF vision name (``visual.x`` -> ``vision_model.x``)."""
    assert hf_name.startswith(HF_VISION_PREFIX), hf_name
    return VISION_PREFIX + hf_name[len(HF_VISION_PREFIX):]


def vision_hf_name(megatron_key: str) -> str:
    assert megatron_key.startswith(VISION_PREFIX), megatron_key
    return HF_VISION_PREFIX + megatron_key[len(VISION_PREFIX):]


# --- tensor layouts ---------------------------------------------------------------------------------

def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """Interleave HF q/k/v (weights [rows, in] or biases [rows]) per query group into megatron's linear_qkv.

    Output rows: for g in groups: [q rows of the heads of group g; k rows of g; v rows of g].
    """
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    G = num_query_groups
    tail = tuple(q.shape[1:])
    if q.shape[0] % G or k.shape[0] % G or k.shape != v.shape or tuple(k.shape[1:]) != tail:
        raise ValueError(f"q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not fit {G} groups")
    parts = [t.reshape(G, t.shape[0] // G, *tail) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def qkv_from_megatron(qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int,
                      head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `qkv_to_megatron`: split megatron's interleaved linear_qkv into contiguous HF q, k, v."""
    G = num_query_groups
    h = num_attention_heads // G
    tail = tuple(qkv.shape[1:])
    if qkv.shape[0] != (num_attention_heads + 2 * G) * head_dim:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected {(num_attention_heads + 2 * G) * head_dim}")
    grouped = qkv.reshape(G, (h + 2) * head_dim, *tail)
    q, k, v = torch.split(grouped, [h * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(),
            v.reshape(-1, *tail).contiguous())


def fc1_to_megatron(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """megatron linear_fc1 global weight: [gate; up] along rows."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate/up differ: {tuple(gate.shape)} {gate.dtype} vs {tuple(up.shape)} {up.dtype}")
    return torch.cat([gate, up], dim=0)


def fc1_from_megatron(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `fc1_to_megatron`."""
    if fc1.shape[0] % 2:
        raise ValueError(f"linear_fc1 has an odd number of rows ({fc1.shape[0]})")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()
