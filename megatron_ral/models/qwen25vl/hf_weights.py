"""In-memory HF -> megatron weight mapping for one rank's Qwen25VLModel.

Takes a full HF state dict (released naming ``model.layers.N...`` / ``visual...`` / ``lm_head``, or
the transformers-5 in-memory naming ``model.language_model...`` / ``model.visual...``) and fills the
local shard of every parameter of this rank's model (its tensor-parallel slice, its pipeline
stage's layers). Names and global layouts come from megatron_ral.models.qwen25vl.mapping; for
whole-checkpoint conversion with bounded memory use megatron_ral.checkpoint.convert (HF -> torch_dist)
and load it with megatron's dist_checkpointing into ``model.sharded_state_dict()``.

Layouts (global tensors, before the TP split):
- linear_qkv: per KV group g: [q heads of g; k_g; v_g] rows (weight and bias), split on dim 0;
- linear_fc1: [gate; up]; TP rank r holds [gate_r; up_r];
- linear_proj / linear_fc2: split on dim 1; word embeddings / output layer: split on dim 0
  after zero-padding the vocabulary to the model's padded size.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_ral.models.qwen25vl.mapping import canonical_hf_name, qkv_to_megatron


def _tp_chunk(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of shape {tuple(t.shape)} is not divisible by TP={size}")
    return t.chunk(size, dim=dim)[rank]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        raise ValueError(f"vocabulary of {t.shape[0]} rows does not fit the model's {rows}")
    pad = t.new_zeros(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, pad], dim=0)


def local_state_from_hf(model, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{megatron local key: tensor} for every parameter of this rank's Qwen25VLModel."""
    hf = {canonical_hf_name(k): v for k, v in hf_state.items()}
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg = model.config
    groups = cfg.num_query_groups
    out: dict[str, torch.Tensor] = {}

    if model.vision_model is not None:
        for name in model.vision_model.state_dict():
            out[f"vision_model.{name}"] = hf[f"visual.{name}"]

    lm = model.language_model
    vp = model.padded_vocab_size
    if model.pre_process:
        emb = _pad_rows(hf["model.embed_tokens.weight"], vp)
        out["language_model.embedding.word_embeddings.weight"] = _tp_chunk(emb, 0, tp_rank, tp)
    if model.post_process:
        out["language_model.decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if not (model.share_embeddings_and_output_weights and model.pre_process):
            head_key = "model.embed_tokens.weight" if model.share_embeddings_and_output_weights else "lm_head.weight"
            out["language_model.output_layer.weight"] = _tp_chunk(_pad_rows(hf[head_key], vp), 0, tp_rank, tp)

    for local_idx, layer in enumerate(lm.decoder.layers):
        g = layer.layer_number - 1
        src = f"model.layers.{g}."
        dst = f"language_model.decoder.layers.{local_idx}."
        qkv_w = qkv_to_megatron(hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
                               hf[src + "self_attn.v_proj.weight"], groups)
        qkv_b = qkv_to_megatron(hf[src + "self_attn.q_proj.bias"], hf[src + "self_attn.k_proj.bias"],
                               hf[src + "self_attn.v_proj.bias"], groups)
        out[dst + "self_attention.linear_qkv.weight"] = _tp_chunk(qkv_w, 0, tp_rank, tp)
        out[dst + "self_attention.linear_qkv.bias"] = _tp_chunk(qkv_b, 0, tp_rank, tp)
        out[dst + "self_attention.linear_proj.weight"] = _tp_chunk(hf[src + "self_attn.o_proj.weight"], 1, tp_rank, tp)
        gate = _tp_chunk(hf[src + "mlp.gate_proj.weight"], 0, tp_rank, tp)
        up = _tp_chunk(hf[src + "mlp.up_proj.weight"], 0, tp_rank, tp)
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        out[dst + "mlp.linear_fc2.weight"] = _tp_chunk(hf[src + "mlp.down_proj.weight"], 1, tp_rank, tp)
        in_norm = hf[src + "input_layernorm.weight"]
        post_norm = hf[src + "post_attention_layernorm.weight"]
        if model.backend == "te":
            out[dst + "self_attention.linear_qkv.layer_norm_weight"] = in_norm
            out[dst + "mlp.linear_fc1.layer_norm_weight"] = post_norm
        else:
            out[dst + "input_layernorm.weight"] = in_norm
            out[dst + "pre_mlp_layernorm.weight"] = post_norm
    return out


@torch.no_grad()
def load_hf_weights(model, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy an HF state dict into this rank's model; every parameter must be covered."""
    mapped = local_state_from_hf(model, hf_state)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(mapped))
    if missing:
        raise KeyError(f"parameters without an HF source: {missing}")
    for name, tensor in mapped.items():
        if name not in params:
            raise KeyError(f"mapped tensor {name} is not a parameter of the model")
        dst = params[name]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: model shape {tuple(dst.shape)} != mapped {tuple(tensor.shape)}")
        dst.copy_(tensor.to(dtype=dst.dtype, device=dst.device))
