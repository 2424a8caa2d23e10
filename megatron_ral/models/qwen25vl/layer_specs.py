"""Layer specs of the Qwen2.5-VL language model (Qwen2 decoder layers) for megatron-core.

Two backends build the same parameters:
- ``local``: megatron-core's pure-torch modules (``input_layernorm`` / ``pre_mlp_layernorm`` are
  separate torch RMSNorms); runs on CPU.
- ``te``: Transformer Engine modules; the norms are fused into ``linear_qkv`` / ``linear_fc1``
  (``...linear_qkv.layer_norm_weight``, ``...linear_fc1.layer_norm_weight``).

``auto`` picks ``te`` when Transformer Engine imports and CUDA is available, else ``local``.

The LAST decoder layer gets its own core attention module, the place where the attention policy
is read from the post-RoPE queries and keys: by default (``last_layer_core_attention="capture"``)
the backend's core attention with a capture hook (see capture.py; no cost while no hook is set).
Pass None for the plain module, or any module class / ModuleSpec with the constructor and forward
signature of megatron's ``DotProductAttention`` / ``TEDotProductAttention``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Literal

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_ral.models.qwen25vl.capture import capture_core_attention

Backend = Literal["auto", "local", "te"]


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401

        from megatron.core.extensions.transformer_engine import TENorm  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: Backend = "auto") -> Literal["local", "te"]:
    """'auto' -> 'te' if Transformer Engine imports and CUDA is present, else 'local'."""
    if backend == "auto":
        return "te" if (torch.cuda.is_available() and transformer_engine_available()) else "local"
    if backend == "te" and not transformer_engine_available():
        raise RuntimeError("layer spec backend 'te' requested but transformer_engine is not importable")
    if backend not in ("local", "te"):
        raise ValueError(f"unknown layer spec backend {backend!r}; choose 'auto', 'local' or 'te'")
    return backend


LOCAL_ATTENTION = ("sdpa", "megatron")


def qwen2_layer_spec(backend: Literal["local", "te"], local_attention: str = "sdpa") -> ModuleSpec:
    """Spec of one Qwen2 decoder layer (RMSNorm, QKV-biased GQA attention, SwiGLU MLP).

    The biases, GLU and norm type come from the TransformerConfig (add_qkv_bias=True,
    add_bias_linear=False, gated_linear_unit=True, normalization='RMSNorm'). ``local_attention`` picks the
    local spec's core attention: "sdpa" (the default: core_attention.LocalCoreAttention, torch's fused kernel
    for plain input and the one local module for packed layouts and context parallelism) or "megatron"
    (megatron-core's DotProductAttention, which materialises the scores; plain input only); both have the
    same parameters and state.
    """
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        from megatron_ral.models.qwen25vl.te_core_attention import te_layout_core_attention

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
        te_core = spec.submodules.self_attention.submodules.core_attention   # TE's DotProductAttention
        return with_core_attention(spec, _subclassed(te_core, te_layout_core_attention))
    spec = get_gpt_layer_local_spec(qk_layernorm=False, normalization="RMSNorm")
    if local_attention not in LOCAL_ATTENTION:
        raise ValueError(f"local_attention must be one of {LOCAL_ATTENTION}, got {local_attention!r}")
    if local_attention == "sdpa":
        from megatron_ral.models.qwen25vl.core_attention import LocalCoreAttention

        spec = with_core_attention(spec, LocalCoreAttention)
    return spec


def final_norm_spec(backend: Literal["local", "te"]):
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm


def _subclassed(core, factory):
    """A core-attention entry of a spec (a class or a ModuleSpec of one) with its class replaced by
    ``factory(class)``, e.g. :func:`capture_core_attention`."""
    if isinstance(core, ModuleSpec):
        return dataclasses.replace(core, module=factory(core.module))
    return factory(core)


def with_core_attention(layer_spec: ModuleSpec, core_attention) -> ModuleSpec:
    """A copy of ``layer_spec`` whose self-attention uses ``core_attention``."""
    spec = copy.deepcopy(layer_spec)
    attn = spec.submodules.self_attention
    attn.submodules = dataclasses.replace(attn.submodules, core_attention=core_attention)
    return spec


def decoder_layer_specs(
    config: TransformerConfig, backend: Literal["local", "te"], last_layer_core_attention="capture",
    local_attention: str = "sdpa",
) -> list[ModuleSpec]:
    """Specs of all ``config.num_layers`` decoder layers (global order)."""
    base = qwen2_layer_spec(backend, local_attention)
    specs = [base] * config.num_layers
    if last_layer_core_attention == "capture":
        plain = base.submodules.self_attention.submodules.core_attention
        last_layer_core_attention = _subclassed(plain, capture_core_attention)
    if last_layer_core_attention is not None:
        specs[-1] = with_core_attention(base, last_layer_core_attention)
    return specs


def decoder_block_spec(
    config: TransformerConfig,
    backend: Backend = "auto",
    last_layer_core_attention="capture",
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    local_attention: str = "sdpa",
) -> TransformerBlockSubmodules:
    """The decoder-block spec holding the layers of this pipeline stage."""
    backend = resolve_backend(backend)
    specs = decoder_layer_specs(config, backend, last_layer_core_attention, local_attention)
    n_local = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    layout = config.pipeline_model_parallel_layout
    if layout is not None:
        from megatron.core.transformer.enums import LayerType

        ids = layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank)
        local = [specs[i] for i in ids]
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        local = specs[offset : offset + n_local]
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=final_norm_spec(backend))
