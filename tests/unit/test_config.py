"""Every config rule fails with one error naming its key; the CLI exits 2 with one line."""

import json
import subprocess
import sys

import pytest

from megatron_ral.config import ConfigError, ModelDims, load_config, validate

DIMS = ModelDims(num_layers=28, num_attention_heads=28, num_query_groups=4)


def err(overrides, world_size=None, dims=DIMS, cuda=None):
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, overrides), world_size=world_size, dims=dims, cuda_available=cuda)
    return e.value


def test_defaults_are_valid():
    cfg = validate(load_config(None, []), dims=DIMS, world_size=8)
    assert cfg.algorithm.name == "ral" and cfg.algorithm.rollouts_per_prompt == 8
    assert cfg.algorithm.kl_beta == 0.04 and cfg.optimizer.lr == 1e-5
    assert cfg.logging.wandb_mode == "offline"


def test_context_parallel_layouts_validate():
    for packing in ("none", "auto", "sequences"):
        cfg = validate(load_config(None, ["parallel.context_parallel_size=2", f"training.packing={packing}",
                                          "parallel.cp_comm_type=a2a"]), dims=DIMS, world_size=8)
        assert cfg.parallel.context_parallel_size == 2 and cfg.training.packing == packing
    with pytest.raises(ConfigError, match="training.packing"):  # shared-prompt streams are not split over CP
        validate(load_config(None, ["parallel.context_parallel_size=2", "training.packing=groups"]),
                 dims=DIMS, world_size=8)
    validate(load_config(None, ["training.packing=groups"]), dims=DIMS, world_size=8)  # groups without CP


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("algorithm:\n  lambda_attn: 5\n  name: grpo\nparallel:\n  pipeline_layer_split: [13, 15]\n")
    cfg = load_config(f, ["algorithm.lambda_attn=0.5", "parallel.pipeline_model_parallel_size=2"])
    assert cfg.algorithm.lambda_attn == 0.5 and isinstance(cfg.algorithm.lambda_attn, float)
    assert cfg.algorithm.name == "grpo" and cfg.parallel.pipeline_layer_split == [13, 15]
    validate(cfg, dims=DIMS)


@pytest.mark.parametrize("overrides,world,key,words", [
    (["parallel.tensor_model_parallel_size=8"], None, "parallel.tensor_model_parallel_size", "attention heads"),
    (["parallel.tensor_model_parallel_size=7"], None, "parallel.tensor_model_parallel_size", "query groups"),
    (["parallel.pipeline_model_parallel_size=3"], None, "parallel.pipeline_model_parallel_size", "divide the number of layers"),
    (["parallel.tensor_model_parallel_size=2"], 3, "parallel.tensor_model_parallel_size", "divisible"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layer_split=[10,10]"], None,
     "parallel.pipeline_layer_split", "sum to"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layer_split=[28]"], None,
     "parallel.pipeline_layer_split", "one entry per pipeline stage"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layer_split=[28,0]"], None,
     "parallel.pipeline_layer_split", ">= 1 layer"),
    (["parallel.sequence_parallel=true"], None, "parallel.sequence_parallel", "tensor_model_parallel_size > 1"),
    (["algorithm.rollouts_per_prompt=1"], None, "algorithm.rollouts_per_prompt", ">= 2"),
    (["algorithm.updates_per_rollout=1"], None, "algorithm.updates_per_rollout", "zero on the first update"),
    (["algorithm.name=ppo"], None, "algorithm.name", "one of"),
    (["algorithm.lambda_attn=-1"], None, "algorithm.lambda_attn", ">= 0"),
    (["algorithm.kl_beta=-0.1"], None, "algorithm.kl_beta", ">= 0"),
    (["algorithm.kl_clamp=-1"], None, "algorithm.kl_clamp", "must be > 0"),
    (["algorithm.old_policy_dtype=fp64"], None, "algorithm.old_policy_dtype", "one of"),
    (["algorithm.clip_eps=0"], None, "algorithm.clip_eps", "> 0"),
    (["algorithm.attn_divergence=tv"], None, "algorithm.attn_divergence", "one of"),
    (["algorithm.attn_aggregation=max"], None, "algorithm.attn_aggregation", "one of"),
    (["algorithm.name=ral_distill"], None, "algorithm.teacher_hf_path", "teacher"),
    (["algorithm.name=sft", "algorithm.dynamic_sampling=true"], None, "algorithm.dynamic_sampling", "RL algorithm"),
    (["algorithm.max_sampling_rounds=0"], None, "algorithm.max_sampling_rounds", ">= 1"),
    (["algorithm.logprob_diff_warn=0"], None, "algorithm.logprob_diff_warn", "> 0 or null"),
    (["generation.top_p=0"], None, "generation.top_p", "(0, 1]"),
    (["generation.temperature=-1"], None, "generation.temperature", ">= 0"),
    (["generation.max_new_tokens=0"], None, "generation.max_new_tokens", ">= 1"),
    (["optimizer.lr=0"], None, "optimizer.lr", "> 0"),
    (["optimizer.min_lr=1"], None, "optimizer.min_lr", "[0, optimizer.lr]"),
    (["optimizer.lr_schedule=step"], None, "optimizer.lr_schedule", "one of"),
    (["training.micro_batch_size=0"], None, "training.micro_batch_size", ">= 1"),
    (["training.packing=padded"], None, "training.packing", "one of"),
    (["training.max_tokens_per_micro_batch=0"], None, "training.max_tokens_per_micro_batch", ">= 1"),
    (["training.packing=groups", "algorithm.name=sft"], None, "training.packing", "one target per prompt"),
    (["training.packing=groups", "parallel.context_parallel_size=2"], None, "training.packing",
     "context parallelism"),
    (["training.packing=groups", "model.layer_spec=te"], None, "training.packing", "local layer spec"),
    (["training.packing=sequences", "model.layer_spec=te", "parallel.context_parallel_size=2"], None,
     "training.packing", "context parallelism"),
    (["checkpoint.keep_last=0"], None, "checkpoint.keep_last", ">= 1"),
    (["logging.wandb_mode=cloud"], None, "logging.wandb_mode", "one of"),
    (["model.layer_spec=fast"], None, "model.layer_spec", "one of"),
    (["model.dtype=fp8"], None, "model.dtype", "one of"),
    (["data.video_backend=ffmpeg"], None, "data.video_backend", "auto|dali|pyav"),
    (["data.fps=0"], None, "data.fps", "> 0"),
    (["model.rope_text_after_vision=hf"], None, "model.rope_text_after_vision", "one of"),
    (["model.attention_backend=sdpa"], None, "model.attention_backend", "one of"),
    (["data.video_untagged_matrix=srgb"], None, "data.video_untagged_matrix", "auto|bt601|bt709"),
    (["model.attention_backend=flash", "model.dtype=fp32"], None, "model.attention_backend", "needs bf16 or fp16"),
    (["parallel.context_parallel_size=2", "training.packing=groups"], None, "training.packing",
     "not supported under context parallelism"),
    (["training.packing=streams"], None, "training.packing", "one of"),
    (["parallel.cp_comm_type=ring"], None, "parallel.cp_comm_type", "one of"),
    (["parallel.context_parallel_size=2"], 3, "parallel.tensor_model_parallel_size", "TP*PP*CP"),
])
def test_rule_names_key(overrides, world, key, words):
    e = err(overrides, world_size=world)
    assert e.key == key
    assert words in str(e)
    assert str(e).startswith(f"config error: {key}: ")


def test_cpu_only_rules():
    e = err(["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"], cuda=False)
    assert e.key == "parallel.sequence_parallel" and "CPU" in str(e)
    assert err(["model.layer_spec=te"], cuda=False).key == "model.layer_spec"


@pytest.mark.parametrize("overrides,key,words", [
    (["algorithm.lamda_attn=1"], "algorithm.lamda_attn", "did you mean 'algorithm.lambda_attn'"),
    (["algorithm.lambda_attn=abc"], "algorithm.lambda_attn", "expected a number"),
    (["parallel.tensor_model_parallel_size=1.5"], "parallel.tensor_model_parallel_size", "integer"),
    (["model.freeze_vision=maybe"], "model.freeze_vision", "true or false"),
    (["algorithm=3"], "algorithm", "mapping"),
    (["nosuch.key=1"], "nosuch", "unknown key"),
    (["lambda_attn"], "lambda_attn", "section.key=value"),
])
def test_load_errors_name_key(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert e.value.key == key and words in str(e.value)


def test_dims_read_from_hf_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"text_config": {"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}}))
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, [f"model.hf_path={tmp_path}", "parallel.tensor_model_parallel_size=4"]))
    assert e.value.key == "parallel.tensor_model_parallel_size" and "KV heads (2)" in str(e.value)


def test_cli_exit_code_and_single_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "megatron_ral.config", "algorithm.rollouts_per_prompt=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["python -m megatron_ral.config: error: config error: algorithm.rollouts_per_prompt: "
                     "must be >= 2 for group-normalised advantages, got 1"]
    r = subprocess.run([sys.executable, "-m", "megatron_ral.config", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "file not found" in r.stderr
