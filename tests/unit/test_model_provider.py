"""Provider: HF config.json -> megatron TransformerConfig / layer specs / parameter naming."""

import json

import pytest
import torch

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.models.qwen25vl.layer_specs import decoder_layer_specs, resolve_backend, transformer_engine_available
from megatron_ral.models.qwen25vl.provider import (
    LMArchitecture,
    build_model,
    load_hf_config,
    padded_vocab_size,
    pipeline_layout,
    transformer_config_from_hf,
)
from megatron_ral.testing.models import tiny_hf_config
from megatron_ral.platform import destroy, initialize

# config.json of the released 7B model (flat pre-transformers-5 layout, rope_scaling with mrope).
RELEASED_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}


@pytest.fixture(scope="module", autouse=True)
def platform():
    initialize(ParallelConfig(), seed=1234)
    yield
    destroy()  # leave no process group behind for later tests in the session


def test_released_7b_and_3b_configs_map_to_megatron(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_7B))
    cfg = transformer_config_from_hf(str(tmp_path), ParallelConfig(tensor_model_parallel_size=4), dtype=torch.bfloat16)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (28, 3584, 18944)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (28, 4, 128)
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-6
    assert cfg.gated_linear_unit and cfg.add_qkv_bias and not cfg.add_bias_linear
    assert cfg.activation_func is torch.nn.functional.silu
    assert cfg.mrope_section == [16, 24, 24] and cfg.params_dtype == torch.bfloat16 and cfg.bf16
    assert cfg.tensor_model_parallel_size == 4
    arch = LMArchitecture.from_hf(load_hf_config(RELEASED_7B))
    assert arch.rope_theta == 1e6 and not arch.tie_word_embeddings and arch.vocab_size == 152064
    three_b = dict(RELEASED_7B, hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                   num_hidden_layers=36, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936)
    arch3 = LMArchitecture.from_hf(load_hf_config(three_b))
    assert arch3.tie_word_embeddings and arch3.num_query_groups == 2 and arch3.num_layers == 36


def test_bad_configs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        load_hf_config({"model_type": "llama"})
    with pytest.raises(FileNotFoundError):
        load_hf_config(str(tmp_path))
    with pytest.raises(ValueError, match="must divide"):
        transformer_config_from_hf(RELEASED_7B, ParallelConfig(tensor_model_parallel_size=8))
    with pytest.raises(ValueError, match="sum to num_layers"):
        pipeline_layout([2, 2], 3, 2)


def test_vocab_padding_is_tp_independent_for_power_of_two_tp():
    assert padded_vocab_size(152064, 8) == 152064
    assert padded_vocab_size(151936, 1) == padded_vocab_size(151936, 64) == 151936
    assert padded_vocab_size(1100, 1) == padded_vocab_size(1100, 4) == 1152
    assert padded_vocab_size(1000, 3) == 1152  # lcm(128, 3) = 384


def test_uneven_pipeline_layout():
    assert pipeline_layout([1, 2], 3, 2) == [["embedding", "decoder"], ["decoder", "decoder", "loss"]]
    cfg = transformer_config_from_hf(tiny_hf_config("tiny"), ParallelConfig(pipeline_model_parallel_size=2,
                                                                            pipeline_layer_split=[2, 1]))
    assert cfg.pipeline_model_parallel_layout is not None


def test_backend_selection_and_capture_on_last_layer_only():
    expected = "te" if (torch.cuda.is_available() and transformer_engine_available()) else "local"
    assert resolve_backend("auto") == expected
    if not transformer_engine_available():
        with pytest.raises(RuntimeError, match="transformer_engine"):
            resolve_backend("te")
    cfg = transformer_config_from_hf(tiny_hf_config("tiny"))
    specs = decoder_layer_specs(cfg, "local")
    cores = [s.submodules.self_attention.submodules.core_attention for s in specs]
    assert [c.__name__ for c in cores] == ["LocalCoreAttention", "LocalCoreAttention",
                                           "CaptureLocalCoreAttention"]
    assert issubclass(cores[-1], cores[0])
    plain = decoder_layer_specs(cfg, "local", last_layer_core_attention=None)
    assert plain[-1].submodules.self_attention.submodules.core_attention is cores[0]
    megatron = decoder_layer_specs(cfg, "local", local_attention="megatron")
    assert [s.submodules.self_attention.submodules.core_attention.__name__ for s in megatron] == [
        "DotProductAttention", "DotProductAttention", "CaptureDotProductAttention"]


def expected_names(hf_config):
    t = hf_config.text_config
    names = {"language_model.embedding.word_embeddings.weight", "language_model.decoder.final_layernorm.weight"}
    if not hf_config.tie_word_embeddings:
        names.add("language_model.output_layer.weight")
    for i in range(t.num_hidden_layers):
        p = f"language_model.decoder.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight",
                  p + "self_attention.linear_qkv.bias", p + "self_attention.linear_proj.weight",
                  p + "pre_mlp_layernorm.weight", p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"}
    v = hf_config.vision_config
    names |= {"vision_model.patch_embed.proj.weight", "vision_model.merger.ln_q.weight"}
    names |= {f"vision_model.merger.mlp.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")}
    for i in range(v.depth):
        p = f"vision_model.blocks.{i}."
        names |= {p + "norm1.weight", p + "norm2.weight"}
        names |= {p + f"attn.{m}.{w}" for m in ("qkv", "proj") for w in ("weight", "bias")}
        names |= {p + f"mlp.{m}.{w}" for m in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias")}
    return names


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_parameter_names_follow_the_contract(preset):
    hf_config = tiny_hf_config(preset)
    model = build_model(hf_config)
    assert {n for n, _ in model.named_parameters()} == expected_names(hf_config)
    assert all(not p.requires_grad for p in model.vision_model.parameters())
    assert all(p.requires_grad for p in model.language_model.parameters())
    model.train()
    assert model.language_model.training and not model.vision_model.training
    sharded = model.sharded_state_dict(metadata={"non_homogeneous_layers": True})
    assert {k for k in sharded if not k.endswith("_extra_state")} == expected_names(hf_config)
    t = hf_config.text_config
    last = t.num_hidden_layers - 1
    qkv = sharded[f"language_model.decoder.layers.{last}.self_attention.linear_qkv.weight"]
    head = t.hidden_size // t.num_attention_heads
    assert qkv.key == f"language_model.decoder.layers.{last}.self_attention.linear_qkv.weight"
    assert qkv.global_shape == ((t.num_attention_heads + 2 * t.num_key_value_heads) * head, t.hidden_size)
    # checkpoint keys of the local spec's norms use the TE (fused) naming: layout-free across backends
    norm = sharded[f"language_model.decoder.layers.{last}.input_layernorm.weight"]
    assert norm.key == f"language_model.decoder.layers.{last}.self_attention.linear_qkv.layer_norm_weight"


def test_vision_replicas_are_identical_whatever_the_rng_state():
    from megatron_ral.models.qwen25vl.vision import build_vision_tower

    cfg = tiny_hf_config("tiny")
    dtype_before = cfg.vision_config.dtype
    torch.manual_seed(1)
    a = build_vision_tower(cfg.vision_config, dtype=torch.bfloat16).state_dict()
    torch.manual_seed(2)
    b = build_vision_tower(cfg.vision_config, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["patch_embed.proj.weight"].dtype == torch.bfloat16
    assert cfg.vision_config.dtype == dtype_before  # the caller's config is not modified


def test_attention_backend_reaches_megatron_and_conflicting_nvte_variables_are_named(monkeypatch):
    from megatron.core.transformer.enums import AttnBackend

    from megatron_ral.config.errors import ConfigError
    from megatron_ral.models.qwen25vl.provider import check_attention_backend

    hf = tiny_hf_config("tiny")
    # the values megatron-core writes for "fused"; monkeypatch restores the environment afterwards
    for name, value in (("NVTE_FLASH_ATTN", "0"), ("NVTE_FUSED_ATTN", "1"), ("NVTE_UNFUSED_ATTN", "0")):
        monkeypatch.setenv(name, value)
    model = build_model(hf, backend="local", attention_backend="fused", dtype=torch.float32)
    assert model.config.attention_backend == AttnBackend.fused
    # "auto" (the default) with a variable a launcher exported to switch flash attention off
    with pytest.raises(ConfigError) as err:
        build_model(hf, backend="local", dtype=torch.float32)
    msg = str(err.value)
    assert msg.startswith("config error: model.attention_backend: 'auto' needs NVTE_FLASH_ATTN=1")
    assert "the environment has NVTE_FLASH_ATTN=0, NVTE_UNFUSED_ATTN=0" in msg and "\n" not in msg
    check_attention_backend("flash", {"NVTE_FLASH_ATTN": "1"})   # consistent or unset: fine
    check_attention_backend("auto", {})
    with pytest.raises(ConfigError, match="must be one of auto, flash, fused, unfused"):
        check_attention_backend("sdpa", {})


def test_default_dtype_is_bf16_with_cuda_and_fp32_without(monkeypatch):
    """What dtype=None (model.dtype=auto, tools' --dtype auto) resolves to; only CUDA's presence is mocked."""
    from megatron_ral.models.qwen25vl.provider import default_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_dtype() == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_dtype() == torch.bfloat16


def test_context_parallel_config():
    """CP is accepted; cp_comm_type reaches the TransformerConfig (Transformer Engine reads it) only under CP."""
    cfg = transformer_config_from_hf(RELEASED_7B, ParallelConfig(context_parallel_size=2, cp_comm_type="a2a"))
    assert cfg.context_parallel_size == 2 and cfg.cp_comm_type == "a2a"
    assert transformer_config_from_hf(RELEASED_7B, ParallelConfig(context_parallel_size=2)).cp_comm_type is None
    assert transformer_config_from_hf(RELEASED_7B, ParallelConfig(cp_comm_type="a2a")).cp_comm_type is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_parameter_is_in_the_model_dtype(dtype):
    # megatron's torch norms are created in fp32; a half-precision model with fp32 norms breaks megatron's
    # distributed-optimizer checkpoints (it pairs parameters with the wrong optimizer state at save)
    model = build_model(tiny_hf_config("tiny"), backend="local", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.vision_model.rotary_pos_emb.inv_freq.dtype == torch.float32   # buffers stay as they are
