"""Build the megatron-core Qwen2.5-VL model from a Hugging Face ``config.json`` alone.

``load_hf_config`` reads the HF config (directory, file, dict or config object);
``transformer_config_from_hf`` maps it to a megatron ``TransformerConfig``;
``build_model`` builds the :class:`Qwen25VLModel` of this rank's pipeline stage.

Vocabulary padding: the embedding / output layer have ``padded_vocab_size(V, tp)`` rows, the
smallest multiple of lcm(128, tp) that is >= V. The released vocabularies (151936, 152064) and the
tiny checkpoints are multiples of 128 already, so nothing is padded for power-of-two TP <= 128,
and the padded size does not depend on TP in that range (checkpoints stay layout-free). Padded
rows are zero in converted checkpoints and their logits are masked to -inf by the model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ral.models.qwen25vl.hf_config import (  # noqa: F401 - re-exported
    VOCAB_PAD_MULTIPLE,
    LMArchitecture,
    load_hf_config,
    padded_vocab_size,
)


def default_dtype() -> torch.dtype:
    """bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def balanced_layer_split(num_layers: int, pp: int) -> list[int] | None:
    """Layers per pipeline stage: None (megatron's even split) when ``pp`` divides ``num_layers``, else
    as even as possible with the extra layers on the first stages (the last stage also holds the
    output layer)."""
    if pp < 1 or num_layers < pp:
        raise ValueError(f"{pp} pipeline stages need at least {pp} layers, the model has {num_layers}")
    if num_layers % pp == 0:
        return None
    base, extra = divmod(num_layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def pipeline_layout(split: list[int] | None, num_layers: int, pp_size: int):
    """Megatron ``pipeline_model_parallel_layout`` for an explicit per-stage layer count list."""
    if split is None:
        return None
    split = [int(n) for n in split]
    if len(split) != pp_size:
        raise ValueError(f"pipeline_layer_split {split} has {len(split)} entries for {pp_size} pipeline stages")
    if sum(split) != num_layers or min(split) < 0:
        raise ValueError(f"pipeline_layer_split {split} must be non-negative and sum to num_layers={num_layers}")
    stages = [["decoder"] * n for n in split]
    stages[0] = ["embedding"] + stages[0]
    stages[-1] = stages[-1] + ["loss"]
    return stages


def transformer_config_from_hf(
    hf_config,
    parallel=None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> TransformerConfig:
    """Megatron TransformerConfig of the Qwen2.5-VL language model.

    ``parallel``: a ParallelConfig (tensor/pipeline/context parallel sizes, sequence_parallel,
    pipeline_layer_split, cp_comm_type); None means a single rank. Context parallelism: the model splits each
    training sequence over the CP ranks (model.py); Transformer Engine's attention runs its own CP kernel
    (``cp_comm_type``), the local spec's ``LocalCoreAttention`` all-gathers K/V. ``dtype``: parameter dtype (default bf16 on GPU,
    fp32 on CPU). ``overrides`` are passed to TransformerConfig last (e.g. recompute settings).
    """
    hf_config = load_hf_config(hf_config)
    arch = LMArchitecture.from_hf(hf_config)
    if arch.hidden_act != "silu":
        raise ValueError(f"hidden_act {arch.hidden_act!r} unsupported (Qwen2.5-VL uses silu)")
    dtype = dtype or default_dtype()
    tp = getattr(parallel, "tensor_model_parallel_size", 1) if parallel is not None else 1
    pp = getattr(parallel, "pipeline_model_parallel_size", 1) if parallel is not None else 1
    cp = getattr(parallel, "context_parallel_size", 1) if parallel is not None else 1
    sp = bool(getattr(parallel, "sequence_parallel", False)) if parallel is not None else False
    split = getattr(parallel, "pipeline_layer_split", None) if parallel is not None else None
    cp_comm_type = getattr(parallel, "cp_comm_type", None) if parallel is not None else None
    if arch.num_attention_heads % tp or arch.num_query_groups % tp:
        raise ValueError(
            f"tensor_model_parallel_size={tp} must divide the attention heads ({arch.num_attention_heads}) "
            f"and KV heads ({arch.num_query_groups})"
        )
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mrope_section=list(arch.mrope_section),
        rotary_interleaved=False,
        init_method_std=arch.init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # micro-batches may differ in length (RL rollouts); the pipeline then exchanges shapes.
        # (megatron rejects this flag with its default MoE dispatcher, unused by this dense model)
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
    )
    if cp > 1 and cp_comm_type is not None:
        kwargs["cp_comm_type"] = cp_comm_type  # read by Transformer Engine's attention only
    if split is not None:
        kwargs["pipeline_model_parallel_layout"] = pipeline_layout(split, arch.num_layers, pp)
    for name in _ROPE_FUSIONS:
        if overrides.get(name):
            raise ValueError(
                f"{name}=True is not supported: Transformer Engine's fused RoPE kernels index the frequencies by "
                "position (within each packed sequence), while M-RoPE gives every token its own "
                "(temporal, height, width) frequencies"
            )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


# megatron-core switches that route RoPE through Transformer Engine's fused kernels
_ROPE_FUSIONS = ("apply_rope_fusion", "fused_single_qkv_rope")


# What megatron-core's LanguageModule._set_attention_backend writes into the environment for each
# TransformerConfig.attention_backend (NVTE_FLASH_ATTN, NVTE_FUSED_ATTN, NVTE_UNFUSED_ATTN); it asserts
# that a variable already set has that value, for every layer spec (the local one included).
ATTENTION_BACKENDS = {"auto": (1, 1, 1), "flash": (1, 0, 0), "fused": (0, 1, 0), "unfused": (0, 0, 1)}
NVTE_VARIABLES = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


def check_attention_backend(attention_backend: str, environ=None) -> None:
    """Raise ConfigError (one line, naming ``model.attention_backend``) when the environment holds an
    ``NVTE_*`` attention variable megatron-core would refuse for this backend, instead of its assertion
    deep inside the model constructor."""
    from megatron_ral.config.errors import ConfigError

    if attention_backend not in ATTENTION_BACKENDS:
        raise ConfigError("model.attention_backend",
                          f"must be one of {', '.join(ATTENTION_BACKENDS)}; got {attention_backend!r}")
    environ = os.environ if environ is None else environ
    expected = dict(zip(NVTE_VARIABLES, ATTENTION_BACKENDS[attention_backend]))
    wrong = [f"{k}={environ[k]}" for k, v in expected.items() if k in environ and environ[k] != str(v)]
    if wrong:
        want = ", ".join(f"{k}={v}" for k, v in expected.items())
        raise ConfigError(
            "model.attention_backend",
            f"{attention_backend!r} needs {want}, but the environment has {', '.join(wrong)} (set by the launcher, "
            "or by a model built earlier in this process with another backend); unset the NVTE_*_ATTN variables "
            "and choose the kernel with model.attention_backend (flash, fused or unfused)")


def build_model(
    hf_config,
    parallel=None,
    *,
    backend: str = "auto",
    attention_backend: str = "auto",
    dtype: torch.dtype | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    last_layer_core_attention="capture",
    local_attention: str = "sdpa",
    vision_attn_implementation: str = "sdpa",
    rope_text_after_vision: str = "max_position",
    vp_stage: int | None = None,
    **config_overrides,
):
    """The Qwen25VLModel of this rank's pipeline stage (megatron parallel_state must be initialized).

    pre_process / post_process default to whether this rank is the first / last pipeline stage.
    ``backend``: the layer spec ("auto", "local", "te"; model.layer_spec). ``attention_backend``:
    Transformer Engine's attention kernel ("auto", "flash", "fused", "unfused"; model.attention_backend),
    checked against the ``NVTE_*_ATTN`` environment variables first (see check_attention_backend).
    ``last_layer_core_attention``: core attention of the last decoder layer; "capture" (default) is
    the backend's module with a capture hook (capture.py), None the plain one (see layer_specs).
    ``local_attention``: the local spec's core attention, "sdpa" (torch's fused kernel) or "megatron"
    (megatron-core's DotProductAttention); same parameters, same function (sdpa_attention.py).

    The parameters are created in ``dtype`` (bf16 on GPU by default). Never wrap the returned model in
    megatron's ``Float16Module`` (megatron-lm's training loop does for bf16/fp16): it calls
    ``module.bfloat16()`` on the whole model, which also casts the fp32 buffers, among them the vision
    tower's rotary ``inv_freq`` (and the LM's), whose bf16 rounding shifts the 2-D rotary angles of
    every patch; the tower's activations stay in the parameters' dtype without it.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnBackend

    from megatron_ral.models.qwen25vl.layer_specs import decoder_block_spec, resolve_backend
    from megatron_ral.models.qwen25vl.model import Qwen25VLModel

    hf_config = load_hf_config(hf_config)
    check_attention_backend(attention_backend)
    config_overrides.setdefault("attention_backend", AttnBackend[attention_backend])
    config = transformer_config_from_hf(hf_config, parallel, dtype=dtype, **config_overrides)
    backend = resolve_backend(backend)
    if config.context_parallel_size > 1 and config.cp_comm_type is not None and backend != "te":
        import warnings

        warnings.warn(f"parallel.cp_comm_type={config.cp_comm_type!r} is ignored by the local layer spec (its core "
                      "attention all-gathers K and V over the context-parallel group); it selects Transformer "
                      "Engine's context-parallel kernel", stacklevel=2)
    if config.sequence_parallel and backend != "te":
        raise ValueError("sequence_parallel needs the Transformer Engine layer spec (megatron's torch norms refuse it)")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    block_spec = decoder_block_spec(
        config, backend, last_layer_core_attention=last_layer_core_attention, vp_stage=vp_stage,
        local_attention=local_attention,
    )
    model = Qwen25VLModel(
        config=config,
        hf_config=hf_config,
        block_spec=block_spec,
        pre_process=pre_process,
        post_process=post_process,
        vision_attn_implementation=vision_attn_implementation,
        rope_text_after_vision=rope_text_after_vision,
        vp_stage=vp_stage,
        backend=backend,
    )
    params_in_dtype(model.language_model, config.params_dtype)
    return model


def params_in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """Cast the floating-point parameters of ``module`` that are not in ``dtype`` (buffers untouched);
    returns their names.

    megatron-core's torch norms (the local spec's ``WrappedTorchNorm``) create their weights in fp32
    whatever ``params_dtype`` says; megatron-lm casts the whole model afterwards (``Float16Module``, not
    used here, see build_model). Left in fp32 inside a bf16/fp16 model they make megatron's distributed
    optimizer mix parameter dtypes within a parameter group, and its checkpoint code then pairs
    parameters with the wrong optimizer state (megatron-core 0.16: a size mismatch in
    ``get_parameter_state_dp_zero`` at the first save). Transformer Engine's norms already follow
    ``params_dtype``."""
    cast = []
    for name, p in module.named_parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast.append(name)
    return cast
