"""Every shipped configuration validates at the layout it is written for, and the paper's settings are the
ones RESEARCH.md / the RAL paper give (G 8, lr 1e-5, beta 0.04, lambda_attn 1, temperature 1, 1 fps, at most
128 frames of at most 128*28*28 pixels, reward 0.9 / 0.1)."""

from pathlib import Path

import pytest

import yaml

from megatron_ral.config import ModelDims, load_config, validate
from megatron_ral.data.geometry import video_frame_max_pixels

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"
QWEN25VL_7B = ModelDims(num_layers=28, num_attention_heads=28, num_query_groups=4)
TINY = ModelDims(num_layers=3, num_attention_heads=4, num_query_groups=2)


def test_every_example_config_is_covered():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {
        "quickstart_sft.yaml", "quickstart_ral.yaml", "qwen25vl_7b_sft.yaml", "qwen25vl_7b_grpo_video.yaml",
        "qwen25vl_7b_ral_video.yaml", "qwen25vl_7b_ral_zero_video.yaml", "quickstart_distill.yaml",
        "qwen25vl_7b_ral_distill_32b.yaml", "qwen25vl_7b_ral_video_cp.yaml"}


@pytest.mark.parametrize("name", ["quickstart_sft.yaml", "quickstart_ral.yaml", "quickstart_distill.yaml"])
def test_quickstart_configs_validate_on_two_cpu_processes(name):
    cfg = validate(load_config(CONFIGS / name), world_size=2, dims=TINY, cuda_available=False)
    assert cfg.data.template == "answer_only" and cfg.model.dtype == "fp32"


@pytest.mark.parametrize("name,algorithm", [("qwen25vl_7b_grpo_video.yaml", "grpo"), ("qwen25vl_7b_ral_video.yaml", "ral"),
                                            ("qwen25vl_7b_ral_zero_video.yaml", "ral")])
def test_7b_rl_configs_have_the_paper_settings(name, algorithm):
    cfg = validate(load_config(CONFIGS / name), world_size=8, dims=QWEN25VL_7B)
    a, d = cfg.algorithm, cfg.data
    assert a.name == algorithm and a.rollouts_per_prompt == 8 and a.kl_beta == 0.04
    assert cfg.optimizer.lr == 1e-5 and cfg.generation.temperature == 1.0
    assert (a.reward_accuracy_weight, a.reward_format_weight) == (0.9, 0.1)
    assert d.fps == 1.0 and d.max_frames == 128 and d.video_max_pixels == 128 * 28 * 28
    assert d.max_records == 51200 and cfg.model.freeze_vision
    if algorithm == "ral":
        assert a.lambda_attn == 1.0 and a.updates_per_rollout >= 2
    assert d.template == ("answer_only" if "zero" in name else "think")
    # also at 16 GPUs (2 nodes), the data-parallel size doubles
    validate(load_config(CONFIGS / name), world_size=16, dims=QWEN25VL_7B)


def test_7b_sft_config_has_the_paper_settings():
    cfg = validate(load_config(CONFIGS / "qwen25vl_7b_sft.yaml"), world_size=8, dims=QWEN25VL_7B)
    assert cfg.algorithm.name == "sft" and cfg.optimizer.lr == 5e-6 and cfg.data.template == "think"
    assert cfg.model.freeze_vision


@pytest.mark.parametrize("name", ["qwen25vl_7b_sft.yaml", "qwen25vl_7b_grpo_video.yaml", "qwen25vl_7b_ral_video.yaml",
                                  "qwen25vl_7b_ral_zero_video.yaml", "qwen25vl_7b_ral_distill_32b.yaml"])
def test_7b_configs_decode_with_every_data_worker_on_the_gpu(name):
    """The 7B configs' trade-off (README, "Data"): a rank reads prompts_per_step / DP = 32 videos a step; one
    GPU worker would decode them one after another (NVDEC seeks and decodes every frame between keyframes),
    so each data worker gets its own DALI GPU pipeline, for ~1-1.5 GiB of GPU memory each."""
    cfg = validate(load_config(CONFIGS / name), world_size=8, dims=QWEN25VL_7B)
    d = cfg.data
    assert d.num_workers == 4 and d.dali_gpu_workers == d.num_workers
    per_rank = cfg.training.prompts_per_step // (8 // cfg.parallel.tensor_model_parallel_size)
    assert per_rank == 32 and per_rank % d.dali_gpu_workers == 0   # each worker decodes 8 videos a step


def _video_tokens(d) -> int:
    """LM tokens of a video sampled at data.max_frames: the per-frame cap after the shared total-pixel budget,
    in 28x28 cells, times the temporal steps (2 frames each)."""
    cap = video_frame_max_pixels(d.max_frames, d.video_min_pixels, d.video_max_pixels, d.video_total_pixels)
    return d.max_frames // 2 * int(cap) // (28 * 28)


@pytest.mark.parametrize("name", ["qwen25vl_7b_sft.yaml", "qwen25vl_7b_grpo_video.yaml", "qwen25vl_7b_ral_video.yaml",
                                  "qwen25vl_7b_ral_zero_video.yaml"])
def test_7b_configs_sample_128_frames_of_128_cells(name):
    """The paper's video budget, and the total-pixel budget does not shrink the frames below it."""
    d = load_config(CONFIGS / name).data
    assert (d.fps, d.max_frames, d.video_min_pixels, d.video_max_pixels) == (1.0, 128, 128 * 28 * 28, 128 * 28 * 28)
    assert (d.image_min_pixels, d.image_max_pixels) == (128 * 28 * 28, 5120 * 28 * 28)
    assert _video_tokens(d) == 64 * 128


def test_7b_context_parallel_config():
    """512 frames of 128 cells (32768 vision tokens) over TP=4 x CP=2 on 8 GPUs and 16; packing set explicitly."""
    name = "qwen25vl_7b_ral_video_cp.yaml"
    cfg = validate(load_config(CONFIGS / name), world_size=8, dims=QWEN25VL_7B)
    p, d, a = cfg.parallel, cfg.data, cfg.algorithm
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size) == (4, 1, 2)
    assert d.max_frames == 512 and d.fps == 1.0 and d.video_max_pixels == 128 * 28 * 28
    assert _video_tokens(d) == 256 * 128
    assert yaml.safe_load((CONFIGS / name).read_text())["training"]["packing"] in ("none", "sequences")
    dp = 8 // (p.tensor_model_parallel_size * p.context_parallel_size)
    assert d.num_workers == d.dali_gpu_workers == 4 and (cfg.training.prompts_per_step // dp) % d.dali_gpu_workers == 0
    assert a.name == "ral" and a.rollouts_per_prompt == 8 and a.kl_beta == 0.04 and a.lambda_attn == 1.0
    assert cfg.optimizer.lr == 1e-5 and a.updates_per_rollout >= 2
    validate(load_config(CONFIGS / name), world_size=16, dims=QWEN25VL_7B)


def _teacher_32b(tmp_path) -> str:
    """config.json of Qwen2.5-VL-32B's language model (RESEARCH.md sec. 6: 64 layers, 40 heads, 8 KV heads)."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 64, "num_attention_heads": 40,
                                                      "num_key_value_heads": 8, "hidden_size": 5120}))
    return str(tmp_path)


def test_7b_distill_32b_config_has_the_paper_settings_and_fits_its_layouts(tmp_path):
    overrides = [f"algorithm.teacher_hf_path={_teacher_32b(tmp_path)}"]
    cfg = validate(load_config(CONFIGS / "qwen25vl_7b_ral_distill_32b.yaml", overrides), world_size=8,
                   dims=QWEN25VL_7B)
    a, d = cfg.algorithm, cfg.data
    assert a.name == "ral_distill" and a.gamma_attn in (0.05, 0.5, 1.0) and a.gkd_mu > 0
    assert a.gkd_divergence == "reverse_kl" and a.gkd_top_k == 0 and a.lambda_attn == 1.0
    assert a.rollouts_per_prompt == 8 and a.kl_beta == 0.04 and a.updates_per_rollout >= 2
    assert cfg.optimizer.lr == 1e-5 and cfg.generation.temperature == 1.0
    assert d.fps == 1.0 and d.max_frames == 128 and d.video_max_pixels == 128 * 28 * 28 and d.max_records == 51200
    assert cfg.parallel.tensor_model_parallel_size == 4 and cfg.parallel.pipeline_model_parallel_size == 1
    # 2 nodes; and the PP=2 variant its comment describes (student 14 + 14, teacher 32 + 32)
    validate(load_config(CONFIGS / "qwen25vl_7b_ral_distill_32b.yaml", overrides), world_size=16, dims=QWEN25VL_7B)
    validate(load_config(CONFIGS / "qwen25vl_7b_ral_distill_32b.yaml",
                         overrides + ["parallel.pipeline_model_parallel_size=2"]), world_size=8, dims=QWEN25VL_7B)
    # TP=8 cannot hold the 7B's 28 heads; a teacher split that does not sum to its 64 layers is refused
    from megatron_ral.config import ConfigError

    with pytest.raises(ConfigError, match="parallel.tensor_model_parallel_size"):
        validate(load_config(CONFIGS / "qwen25vl_7b_ral_distill_32b.yaml",
                             overrides + ["parallel.tensor_model_parallel_size=8"]), world_size=8, dims=QWEN25VL_7B)
    with pytest.raises(ConfigError, match="teacher_pipeline_layer_split"):
        validate(load_config(CONFIGS / "qwen25vl_7b_ral_distill_32b.yaml",
                             overrides + ["parallel.pipeline_model_parallel_size=2",
                                          "algorithm.teacher_pipeline_layer_split=[30,30]"]),
                 world_size=8, dims=QWEN25VL_7B)
