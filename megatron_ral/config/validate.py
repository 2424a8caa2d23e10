"""Cross-field rules, checked before anything is allocated. Each rule raises one ConfigError naming the key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_ral.config.errors import ConfigError
from megatron_ral.config.schema import Config

ALGORITHMS = ("sft", "grpo", "ral", "ral_distill")
RL_ALGORITHMS = ("grpo", "ral", "ral_distill")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
CP_COMM_TYPES = (None, "p2p", "all_gather", "a2a", "a2a+p2p")  # Transformer Engine's context-parallel kernels


@dataclass(frozen=True)
class ModelDims:
    """The few model sizes the parallel layout must agree with."""

    num_layers: int
    num_attention_heads: int
    num_query_groups: int


def model_dims_from_hf(hf_path: str | Path, key: str = "model.hf_path") -> ModelDims:
    """Read layer/head counts from an HF Qwen2.5-VL ``config.json`` (top level or ``text_config``); errors
    name ``key``."""
    cfg_file = Path(hf_path) / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(key, f"no config.json in {hf_path}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(key, f"{cfg_file} is not valid JSON ({e})") from None
    text = cfg.get("text_config") or cfg
    try:
        heads = int(text["num_attention_heads"])
        return ModelDims(
            num_layers=int(text["num_hidden_layers"]),
            num_attention_heads=heads,
            num_query_groups=int(text.get("num_key_value_heads", heads)),
        )
    except KeyError as e:
        raise ConfigError(key, f"{cfg_file} lacks {e.args[0]}") from None


def teacher_config_dir(algorithm) -> tuple[str, Path | None]:
    """(the key naming the teacher, the directory of its config.json or None when not found): a Megatron
    ``teacher_load`` carries it in itself, its newest ``iter_*`` checkpoint or its parent; else
    ``teacher_hf_path``. File names only (the trainer reports a missing or broken checkpoint itself)."""
    if algorithm.teacher_load:
        load = Path(algorithm.teacher_load)
        iters = sorted(load.glob("iter_*"), key=lambda p: p.name, reverse=True) if load.is_dir() else []
        for d in [load, *[i for i in iters if i.is_dir() and not i.name.endswith((".tmp", ".old"))], load.parent]:
            if (d / "config.json").is_file():
                return "algorithm.teacher_load", d
        return "algorithm.teacher_load", None
    hf = Path(algorithm.teacher_hf_path) if algorithm.teacher_hf_path else None
    return "algorithm.teacher_hf_path", hf if hf is not None and (hf / "config.json").is_file() else None


def _check_teacher_layout(a, tp: int, pp: int) -> None:
    """The teacher runs at the student's TP on the student's PP stages: TP must divide its heads and KV
    heads, its pipeline split must have one entry >= 1 per stage and sum to its layers."""
    split = a.teacher_pipeline_layer_split
    if split is not None:
        _check(len(split) == pp, "algorithm.teacher_pipeline_layer_split",
               f"must have one entry per pipeline stage (PP={pp}), got {len(split)}")
        _check(all(n >= 1 for n in split), "algorithm.teacher_pipeline_layer_split",
               "every stage needs >= 1 teacher layer")
    key, where = teacher_config_dir(a)
    if where is None:
        return
    dims = model_dims_from_hf(where, key)
    _check(dims.num_attention_heads % tp == 0 and dims.num_query_groups % tp == 0, key,
           f"the teacher {where} has {dims.num_attention_heads} attention heads and {dims.num_query_groups} KV heads; "
           f"it runs at the student's TP={tp}, which must divide both")
    if split is not None:
        _check(sum(split) == dims.num_layers, "algorithm.teacher_pipeline_layer_split",
               f"must sum to the teacher's number of layers ({dims.num_layers}, {where}), got {sum(split)}")
    else:
        _check(dims.num_layers >= pp, key,
               f"the teacher {where} has {dims.num_layers} layers, fewer than the {pp} pipeline stages")


def _check(cond: bool, key: str, rule: str) -> None:
    if not cond:
        raise ConfigError(key, rule)


def _one_of(value: object, options: tuple, key: str) -> None:
    _check(value in options, key, f"must be one of {', '.join(map(str, options))}; got {value!r}")


PACKINGS = ("auto", "none", "sequences", "groups")


def _check_packing(cfg: Config) -> None:
    """training.packing and its budget; "groups" needs the local layer spec, an RL algorithm (G responses share a
    prompt) and no context parallelism; "sequences" under the Transformer Engine spec (its THD path) no context
    parallelism."""
    t = cfg.training
    _one_of(t.packing, PACKINGS, "training.packing")
    _check(t.max_tokens_per_micro_batch >= 1, "training.max_tokens_per_micro_batch",
           f"must be >= 1, got {t.max_tokens_per_micro_batch}")
    if t.packing == "sequences" and cfg.model.layer_spec == "te":
        _check(cfg.parallel.context_parallel_size == 1, "training.packing",
               "'sequences' under the Transformer Engine spec with context parallelism is not supported (TE splits "
               "packed input per sequence, the trainer the whole stream): use none, or model.layer_spec: local")
    if t.packing == "groups":
        _check(cfg.model.layer_spec != "te", "training.packing",
               "'groups' needs the local layer spec (model.layer_spec: local or auto without Transformer Engine): "
               "Transformer Engine has no attention mask for responses that share a prompt; use sequences there")
        _check(cfg.algorithm.name != "sft", "training.packing",
               "'groups' shares a prompt across its G responses; SFT has one target per prompt: use sequences or none")
        _check(cfg.parallel.context_parallel_size == 1, "training.packing",
               "'groups' is not supported under context parallelism (parallel.context_parallel_size > 1): use "
               "sequences or none")


def validate(cfg: Config, world_size: int | None = None, dims: ModelDims | None = None,
             cuda_available: bool | None = None) -> Config:
    """Check every rule; return ``cfg`` unchanged when it passes.

    ``dims`` defaults to the sizes read from ``model.hf_path`` when that directory exists; ``world_size``
    and ``cuda_available`` are checked only when given.
    """
    p = cfg.parallel
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    _check(tp >= 1, "parallel.tensor_model_parallel_size", "must be >= 1")
    _check(pp >= 1, "parallel.pipeline_model_parallel_size", "must be >= 1")
    _check(cp >= 1, "parallel.context_parallel_size", "must be >= 1")
    _one_of(p.cp_comm_type, CP_COMM_TYPES, "parallel.cp_comm_type")
    if world_size is not None:
        _check(world_size % (tp * pp * cp) == 0, "parallel.tensor_model_parallel_size",
               f"world size {world_size} must be divisible by TP*PP*CP = {tp}*{pp}*{cp} = {tp * pp * cp}")
    if p.sequence_parallel:
        _check(tp > 1, "parallel.sequence_parallel", "needs tensor_model_parallel_size > 1")
        _check(cfg.model.layer_spec != "local", "parallel.sequence_parallel",
               "needs the Transformer Engine layer spec (megatron-core's torch norms refuse sequence parallelism)")
        if cuda_available is False:
            raise ConfigError("parallel.sequence_parallel",
                              "needs CUDA and Transformer Engine; megatron-core's torch norms refuse it on CPU")
    if dims is None and cfg.model.hf_path and Path(cfg.model.hf_path).is_dir():
        dims = model_dims_from_hf(cfg.model.hf_path)
    if dims is not None:
        _check(dims.num_attention_heads % tp == 0, "parallel.tensor_model_parallel_size",
               f"TP={tp} must divide the number of attention heads ({dims.num_attention_heads})")
        _check(dims.num_query_groups % tp == 0, "parallel.tensor_model_parallel_size",
               f"TP={tp} must divide the number of query groups / KV heads ({dims.num_query_groups})")
        if p.pipeline_layer_split is None:
            _check(dims.num_layers % pp == 0, "parallel.pipeline_model_parallel_size",
                   f"PP={pp} must divide the number of layers ({dims.num_layers}); "
                   "or give parallel.pipeline_layer_split")
    if p.pipeline_layer_split is not None:
        split = p.pipeline_layer_split
        _check(len(split) == pp, "parallel.pipeline_layer_split",
               f"must have one entry per pipeline stage (PP={pp}), got {len(split)}")
        _check(all(n >= 1 for n in split), "parallel.pipeline_layer_split", "every stage needs >= 1 layer")
        if dims is not None:
            _check(sum(split) == dims.num_layers, "parallel.pipeline_layer_split",
                   f"must sum to the number of layers ({dims.num_layers}), got {sum(split)}")

    _one_of(cfg.model.layer_spec, ("auto", "local", "te"), "model.layer_spec")
    _one_of(cfg.model.attention_backend, ("auto", "flash", "fused", "unfused"), "model.attention_backend")
    if cfg.model.attention_backend in ("flash", "fused"):
        _check(cfg.model.dtype != "fp32", "model.attention_backend",
               f"{cfg.model.attention_backend!r} attention needs bf16 or fp16 (model.dtype); in fp32 Transformer "
               "Engine has only its unfused kernel")
    _one_of(cfg.model.dtype, ("auto", "bf16", "fp16", "fp32"), "model.dtype")
    _one_of(cfg.model.rope_text_after_vision, ("max_position", "spatial_extent"), "model.rope_text_after_vision")
    _one_of(cfg.model.recompute_granularity, (None, "selective", "full"), "model.recompute_granularity")
    _check(cfg.model.freeze_vision, "model.freeze_vision",
           "training the vision tower is not supported (its features are computed without gradients); keep it true")
    _check(all(i >= 0 for i in cfg.model.freeze_lm_layers), "model.freeze_lm_layers", "layer indices must be >= 0")
    if dims is not None and cfg.model.freeze_lm_layers:
        _check(max(cfg.model.freeze_lm_layers) < dims.num_layers, "model.freeze_lm_layers",
               f"layer indices must be < the number of layers ({dims.num_layers})")
    if cfg.model.layer_spec == "te" and cuda_available is False:
        raise ConfigError("model.layer_spec", "'te' needs CUDA and Transformer Engine; use 'auto' or 'local'")

    a = cfg.algorithm
    _one_of(a.name, ALGORITHMS, "algorithm.name")
    if a.name in RL_ALGORITHMS:
        _check(a.rollouts_per_prompt >= 2, "algorithm.rollouts_per_prompt",
               f"must be >= 2 for group-normalised advantages, got {a.rollouts_per_prompt}")
    _check(a.updates_per_rollout >= 1, "algorithm.updates_per_rollout", "must be >= 1")
    _check(a.epochs_per_rollout >= 1, "algorithm.epochs_per_rollout", "must be >= 1")
    _check(a.updates_per_rollout % a.epochs_per_rollout == 0, "algorithm.epochs_per_rollout",
           f"must divide algorithm.updates_per_rollout ({a.updates_per_rollout}); each epoch is split into "
           "updates_per_rollout / epochs_per_rollout mini-batches")
    _one_of(a.loss_aggregation, LOSS_AGGREGATIONS, "algorithm.loss_aggregation")
    _one_of(a.reference_placement, ("device", "host"), "algorithm.reference_placement")
    _one_of(a.old_policy_store, ("qk", "rows"), "algorithm.old_policy_store")
    _one_of(a.old_policy_dtype, ("auto", "bf16", "fp16", "fp32"), "algorithm.old_policy_dtype")
    _check(a.adv_eps > 0, "algorithm.adv_eps", f"must be > 0, got {a.adv_eps}")
    _check(not a.dynamic_sampling or a.name in RL_ALGORITHMS, "algorithm.dynamic_sampling",
           f"draws rollout groups: it needs an RL algorithm ({', '.join(RL_ALGORITHMS)}), not {a.name!r}")
    _check(a.max_sampling_rounds >= 1, "algorithm.max_sampling_rounds",
           f"must be >= 1 (rollout rounds per step, the first included), got {a.max_sampling_rounds}")
    _check(a.logprob_diff_warn is None or a.logprob_diff_warn > 0, "algorithm.logprob_diff_warn",
           f"must be > 0 or null (the default of the training dtype), got {a.logprob_diff_warn}")
    if a.name in ("ral", "ral_distill") and a.lambda_attn > 0:
        _check(a.updates_per_rollout >= 2, "algorithm.updates_per_rollout",
               "must be >= 2 for RAL: the attention loss is zero on the first update after a rollout "
               "(p_theta = p_old), so with 1 it never acts")
    _check(a.clip_eps > 0, "algorithm.clip_eps", f"must be > 0, got {a.clip_eps}")
    if a.clip_eps_high is not None:
        _check(a.clip_eps_high > 0, "algorithm.clip_eps_high", f"must be > 0, got {a.clip_eps_high}")
    _check(a.kl_beta >= 0, "algorithm.kl_beta", f"must be >= 0, got {a.kl_beta}")
    _check(a.kl_clamp is None or a.kl_clamp >= 0, "algorithm.kl_clamp",
           f"must be > 0 (a bound on the log-ratio), or 0 / null for none; got {a.kl_clamp}")
    _check(a.lambda_attn >= 0, "algorithm.lambda_attn", f"must be >= 0, got {a.lambda_attn}")
    _one_of(a.attn_divergence, ("jsd", "kl", "reverse_kl"), "algorithm.attn_divergence")
    _one_of(a.attn_aggregation, ("token_mean", "sum"), "algorithm.attn_aggregation")
    _one_of(a.gkd_divergence, ("reverse_kl", "forward_kl", "jsd"), "algorithm.gkd_divergence")
    _check(0 < a.gkd_jsd_beta < 1, "algorithm.gkd_jsd_beta", f"must be in (0, 1), got {a.gkd_jsd_beta}")
    _check(a.gkd_top_k >= 0, "algorithm.gkd_top_k", f"must be >= 0 (0 = exact over the vocabulary), got {a.gkd_top_k}")
    _one_of(a.teacher_placement, ("device", "host"), "algorithm.teacher_placement")
    if a.name == "ral_distill":
        _check(bool(a.teacher_hf_path or a.teacher_load), "algorithm.teacher_hf_path",
               "ral_distill needs a teacher (teacher_hf_path or teacher_load)")
        _check(a.gkd_mu >= 0, "algorithm.gkd_mu", "must be >= 0")
        _check(a.gamma_attn >= 0, "algorithm.gamma_attn", "must be >= 0")
        _check(a.gkd_mu > 0 or a.gamma_attn > 0, "algorithm.gkd_mu",
               "ral_distill needs gkd_mu > 0 or gamma_attn > 0 (with both 0 nothing is learnt from the teacher; "
               "use algorithm.name: ral)")
        _check_teacher_layout(a, tp, pp)
    _check(a.reward_accuracy_weight >= 0 and a.reward_format_weight >= 0, "algorithm.reward_accuracy_weight",
           "reward weights must be >= 0")

    g = cfg.generation
    _check(g.temperature >= 0, "generation.temperature", f"must be >= 0, got {g.temperature}")
    if a.name in RL_ALGORITHMS:
        _check(g.temperature > 0, "generation.temperature", "must be > 0 for RL (rollouts are sampled; 0 means greedy)")
    _check(0 < g.top_p <= 1, "generation.top_p", f"must be in (0, 1], got {g.top_p}")
    _check(g.top_k >= 0, "generation.top_k", "must be >= 0 (0 disables top-k)")
    _check(g.max_new_tokens >= 1, "generation.max_new_tokens", "must be >= 1")
    _check(g.kv_cache_tokens >= 1, "generation.kv_cache_tokens", "must be >= 1")

    o = cfg.optimizer
    _check(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    _check(0 <= o.min_lr <= o.lr, "optimizer.min_lr", "must be in [0, optimizer.lr]")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _check(0 <= o.adam_beta1 < 1, "optimizer.adam_beta1", "must be in [0, 1)")
    _check(0 <= o.adam_beta2 < 1, "optimizer.adam_beta2", "must be in [0, 1)")
    _check(o.adam_eps > 0, "optimizer.adam_eps", "must be > 0")
    _check(o.clip_grad >= 0, "optimizer.clip_grad", "must be >= 0 (0 disables clipping)")
    _check(o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    _one_of(o.lr_schedule, ("constant", "linear", "cosine"), "optimizer.lr_schedule")
    _check(o.initial_loss_scale >= 1, "optimizer.initial_loss_scale",
           f"must be >= 1 (megatron's smallest dynamic loss scale), got {o.initial_loss_scale}")

    t = cfg.training
    _check(t.prompts_per_step >= 1, "training.prompts_per_step", "must be >= 1")
    _check(t.micro_batch_size >= 1, "training.micro_batch_size", "must be >= 1")
    _check_packing(cfg)
    _check(t.train_steps >= 0, "training.train_steps", "must be >= 0")
    _check(t.epochs >= 1, "training.epochs", "must be >= 1")
    _check(t.eval_interval >= 0, "training.eval_interval", "must be >= 0 (0 = no evaluation during training)")
    _check(t.max_eval_records is None or t.max_eval_records >= 1, "training.max_eval_records", "must be >= 1 or null")
    _check(t.max_consecutive_skips >= 1, "training.max_consecutive_skips", "must be >= 1")
    if world_size is not None:
        dp = world_size // (tp * pp * cp) if world_size % (tp * pp * cp) == 0 else None
        if dp:
            _check(t.prompts_per_step % dp == 0, "training.prompts_per_step",
                   f"must be divisible by the data-parallel size {dp} (world {world_size} / TP*PP*CP {tp * pp * cp}), "
                   f"got {t.prompts_per_step}")
    if a.name in RL_ALGORITHMS:
        mini = a.updates_per_rollout // a.epochs_per_rollout
        _check(t.prompts_per_step * a.rollouts_per_prompt >= mini, "algorithm.updates_per_rollout",
               f"{mini} mini-batches per epoch need at least as many sequences per step "
               f"(training.prompts_per_step x algorithm.rollouts_per_prompt = {t.prompts_per_step * a.rollouts_per_prompt})")
    _check(not (t.eval_interval or t.eval_at_start) or bool(cfg.data.eval_files), "data.eval_files",
           "training.eval_interval / eval_at_start need evaluation records")
    _check(bool(t.run_dir), "training.run_dir", "must not be empty")

    c = cfg.checkpoint
    _check(c.save_interval >= 0, "checkpoint.save_interval", "must be >= 0")
    _check(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1 (the last good checkpoint is always kept)")

    try:
        cfg.data.validate()
    except ValueError as e:
        key, _, rule = str(e).partition(" ")
        raise ConfigError(key, rule) from None

    lg = cfg.logging
    _one_of(lg.wandb_mode, ("offline", "online", "disabled"), "logging.wandb_mode")
    _check(lg.log_interval >= 1, "logging.log_interval", "must be >= 1")
    _check(lg.term_grad_norm_interval >= 0, "logging.term_grad_norm_interval", "must be >= 0 (0: never)")
    _check(lg.term_grad_norm_interval == 0 or cfg.model.dtype != "fp16", "logging.term_grad_norm_interval",
           "is not available with model.dtype fp16 (the diagnostic would move the loss scaler); use bf16 or fp32")
    return cfg
