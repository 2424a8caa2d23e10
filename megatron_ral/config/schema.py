"""Typed configuration: one dataclass per concern, passed explicitly to the code that uses it.

Every field has a default that runs the embedded tiny example on CPU; the docstring of each class is the
configuration reference (README repeats it). Validation lives in ``validate.py``; YAML loading and
``key=value`` overrides in ``loader.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_ral.config.data import DataConfig


@dataclass
class ModelConfig:
    """The policy model.

    hf_path: Hugging Face Qwen2.5-VL directory (config.json, tokenizer, processor) the model is built from.
    load: Megatron distributed checkpoint to load weights from (from tools/convert_hf_to_megatron.py or a
        training run); empty means take the weights from ``hf_path`` through the converter.
    layer_spec: "auto" (Transformer Engine when CUDA and TE are present, else local torch), "local" or "te".
    attention_backend: Transformer Engine's attention kernel: "auto" (TE picks flash, fused or unfused per
        shape and dtype), "flash", "fused" or "unfused". megatron-core exports NVTE_FLASH_ATTN,
        NVTE_FUSED_ATTN and NVTE_UNFUSED_ATTN to match (for every spec) and refuses values already set
        otherwise: unset them and choose here. The local spec computes attention in torch whatever the value.
    dtype: "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16" or "fp32".
    freeze_vision: keep the vision tower and merger frozen (the paper trains the LM only).
    freeze_lm_embeddings: keep the LM's input embedding (and, when tied, the output layer) frozen.
    freeze_lm_layers: 0-based indices of LM decoder layers to keep frozen (e.g. [0, 1, 2]); empty = none.
    recompute_granularity: None, "selective" or "full" activation recomputation.
    rope_text_after_vision: where M-RoPE text positions resume after an image/video: "max_position" (the
        vision block's largest position + 1, as the released Qwen2.5-VL code and vLLM do) or
        "spatial_extent" (start + max(h, w) / merge, as transformers >= 5.3 does; the two differ only for
        videos whose time span exceeds their spatial extent).
    """

    hf_path: str = ""
    load: str = ""
    layer_spec: str = "auto"
    attention_backend: str = "auto"
    dtype: str = "auto"
    freeze_vision: bool = True
    freeze_lm_embeddings: bool = False
    freeze_lm_layers: list[int] = field(default_factory=list)
    recompute_granularity: Optional[str] = None
    rope_text_after_vision: str = "max_position"


@dataclass
class ParallelConfig:
    """Parallel layout. data parallel size = world size / (TP * PP * CP).

    pipeline_layer_split: explicit number of LM layers per pipeline stage (uneven splits allowed);
        None splits evenly (then PP must divide the layer count).
    sequence_parallel: needs TP > 1 and the Transformer Engine layer spec (CUDA).
    use_distributed_optimizer: shard optimizer state over data-parallel ranks (megatron-core).
    context_parallel_size: C > 1 splits every training sequence (SFT, old / reference passes, updates) over C
        ranks with megatron's load-balanced split (2C chunks; rank i holds chunks i and 2C - 1 - i). A sequence
        whose length is not a multiple of 2C is right-padded to one. The vision tower's frames are split over
        the same ranks. Rollouts treat the C ranks as extra data-parallel generators (each generates a share
        of the prompts). Packing under CP: training.packing none or sequences (groups is refused).
    cp_comm_type: Transformer Engine's context-parallel kernel ("p2p", "all_gather", "a2a", "a2a+p2p"; None =
        TE's default p2p). The local layer spec ignores it (with a warning): it all-gathers K and V.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    pipeline_layer_split: Optional[list[int]] = None
    use_distributed_optimizer: bool = True
    cp_comm_type: Optional[str] = None


@dataclass
class AlgorithmConfig:
    """What is optimised.

    name: "sft", "grpo", "ral" (GRPO + attention loss) or "ral_distill" (+ on-policy teacher distillation).
        RAL-zero is "ral" with ``data.template: answer_only`` (no <think> in prompt, format reward or SFT data).
    rollouts_per_prompt: G, responses sampled per prompt (paper: 8); group-normalised advantages need >= 2.
    updates_per_rollout: optimizer steps taken on each rollout batch = mini-batches x epochs_per_rollout.
        The RAL term is exactly zero on the first update after a rollout (p_theta = p_old), so "ral" needs >= 2.
    epochs_per_rollout: passes over the rollout batch; each pass is split into
        updates_per_rollout / epochs_per_rollout mini-batches (must divide it).
    loss_aggregation: how per-token policy and KL terms become one number: "token_mean" (mean over every
        response token of the global mini-batch; verl's default, TRL "bnpo"), "seq_mean_token_mean" (mean over
        sequences of each sequence's token mean; GRPO paper, TRL "grpo", Video-R1) or "seq_mean_token_sum_norm"
        (mean over sequences of token sums divided by generation.max_new_tokens; Dr. GRPO). The normaliser is
        always the global one (all micro-batches, pipeline stages and data-parallel ranks).
    clip_eps / clip_eps_high: PPO ratio clip range [1 - clip_eps, 1 + clip_eps_high] (high defaults to low).
    kl_beta: weight of the k3 KL to the reference policy (paper: 0.04); 0 skips the reference pass.
    kl_clamp: bound c on the log-ratio d = ref_logp - logp of each token before the k3 term e^d - d - 1 is
        formed (d clipped to [-c, c], so k3 <= e^c - c - 1; tokens beyond the bound get no KL gradient). The
        k3 value itself is not clipped (verl bounds d at 20 and k3 at 10). null or 0: no bound (k3 can
        overflow to inf when the policy drifts far from the reference, and the step is then skipped).
    reference_placement: where the reference weights live between reference passes: "device" (a resident copy)
        or "host" (host memory, copied in for each reference pass; saves device memory).
    adv_eps: A = (r - mean) / (std + adv_eps) per prompt group (unbiased std).
    drop_zero_std_groups / dynamic_sampling / max_sampling_rounds: one mechanism for groups whose G rewards
        are all equal (A = 0: no GRPO signal; counted as adv/zero_std_groups whatever the settings).
        drop_zero_std_groups leaves them out of the update without replacing them (the batch shrinks);
        dynamic_sampling (DAPO's) leaves them out and draws further rounds of training.prompts_per_step
        prompts until the step holds prompts_per_step informative groups or max_sampling_rounds rounds (the
        first included) were drawn; the first prompts_per_step informative groups in draw order are kept (a
        step short of them after the last round trains on the ones it found). dynamic_sampling implies
        dropping. Either way the kept groups are chosen over the global batch and spread over the
        data-parallel ranks as the loader spreads prompts, so the update does not depend on the DP size.
        adv/groups_drawn counts the groups sampled in the step, adv/groups_dropped those left out of the
        update; the reward/* and response/* metrics cover every drawn group.
    logprob_diff_warn: warn (once per process) when rollout/logprob_diff_max, the largest |generation log-prob
        - trainer log-prob| over a step's response tokens (same weights, same quantity log softmax(logits / T)),
        exceeds it. None: by the training dtype, 1e-3 in fp32 (the KV-cache decode and the training forward
        then agree to a few 1e-6; more is a bug), 1.0 in bf16 and 0.25 in fp16 (rounding alone moves single
        log-probs by 0.04-0.08 on the tiny model in bf16, more on large models and long responses; a bug,
        e.g. wrong positions or stale weights, moves them by whole nats).
    lambda_attn: weight of the attention loss A * D(p_theta || p_old) (paper searched 0.5, 1, 5).
    attn_divergence: "jsd" (paper), "kl" (KL(p_theta || p_old)) or "reverse_kl" (KL(p_old || p_theta)).
    attn_aggregation: "token_mean" (Eq. 3: mean over the response tokens of the global mini-batch) or "sum"
        (Sec. 3.4: sum over each response's tokens, mean over the global mini-batch's responses).
    old_policy_store: how p_old is kept between the old pass and the updates: "qk" (last-layer Q rows + K,
        recomputed) or "rows" (the rows themselves); old_policy_offload keeps it in host memory.
    old_policy_dtype: the store's dtype: "auto" (Q/K in the model's dtype, rows in the dtype they are
        computed in, fp32: p_old is exact and the first update's attention gradient is exactly 0), or
        "bf16" / "fp16" / "fp32" (rounded rows give a spurious first-update gradient: measured at 23% (bf16)
        and 3% (fp16) of the gradient after a 1% change of the queries; see attention/old_policy.py).
    gkd_mu, gamma_attn: distillation weights (logit GKD and attention JSD to the teacher).
    gkd_divergence: the GKD divergence between the student's p_theta and the teacher's p_phi output
        distributions (softmax(logits / generation.temperature)), per response token:
        "reverse_kl" = KL(p_theta || p_phi) = sum_v p_theta(v) ln(p_theta(v) / p_phi(v)) (default: the paper's "typically"),
        "forward_kl" = KL(p_phi || p_theta), "jsd" = beta KL(p_theta || m) + (1 - beta) KL(p_phi || m) with
        m = beta p_theta + (1 - beta) p_phi, beta = gkd_jsd_beta (0.5: the symmetric JSD, <= ln 2).
        Beside attn_divergence, on attention rows: "kl" = KL(p_theta || p_old), "reverse_kl" = KL(p_old || p_theta).
    gkd_jsd_beta: beta of gkd_divergence "jsd", in (0, 1).
    gkd_top_k: 0 = GKD exact over the whole vocabulary; k > 0 = over the teacher's top-k ids plus one bucket
        for the rest of each side's mass (a lower bound of the exact value, equal at k = vocabulary size).
    teacher_hf_path / teacher_load: the teacher model for "ral_distill": an HF directory (converted once into
        RUN_DIR/teacher_mcore) or a Megatron checkpoint carrying its HF files (teacher_load wins when both are
        given). It must share the student's vocabulary, tokenizer, special tokens, chat template and vision
        patching (checked at start-up). It runs forward only on the student's ranks, at the student's TP size.
    teacher_pipeline_layer_split: the teacher's LM layers per pipeline stage (its own split over the student's
        stages); null = as even as possible (extra layers on the first stages).
    teacher_placement: where the teacher's weights live between teacher passes: "device" (resident) or "host"
        (host memory, moved in for each teacher pass; with exact GKD that is once per mini-batch).
        The teacher's attention rows p_phi (gamma_attn > 0) are kept like p_old: old_policy_store,
        old_policy_dtype, old_policy_offload.
    reward_accuracy_weight / reward_format_weight: r = w_acc * r_acc + w_fmt * r_fmt (paper: 0.9 / 0.1).
    reward_function: "package.module:function" replacing the Video-R1 reward: called as
        f(response_text, record, template) and returning a float (the total) or an object with float
        ``accuracy``, ``format`` and ``total``; empty = ``megatron_ral.rl.rewards.score`` (the paper's).
    """

    name: str = "ral"
    rollouts_per_prompt: int = 8
    updates_per_rollout: int = 2
    epochs_per_rollout: int = 1
    loss_aggregation: str = "token_mean"
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    kl_beta: float = 0.04
    kl_clamp: Optional[float] = None
    reference_placement: str = "device"
    adv_eps: float = 1e-6
    drop_zero_std_groups: bool = False
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    logprob_diff_warn: Optional[float] = None
    lambda_attn: float = 1.0
    attn_divergence: str = "jsd"
    attn_aggregation: str = "token_mean"
    old_policy_store: str = "qk"
    old_policy_dtype: str = "auto"
    old_policy_offload: bool = False
    gkd_mu: float = 1.0
    gamma_attn: float = 0.5
    gkd_divergence: str = "reverse_kl"
    gkd_jsd_beta: float = 0.5
    gkd_top_k: int = 0
    teacher_hf_path: str = ""
    teacher_load: str = ""
    teacher_pipeline_layer_split: Optional[list[int]] = None
    teacher_placement: str = "device"
    reward_accuracy_weight: float = 0.9
    reward_format_weight: float = 0.1
    reward_function: str = ""


@dataclass
class GenerationConfig:
    """Rollout sampling.

    temperature / top_p / top_k: sampling (top_k 0 = off; temperature 0 = greedy).
    max_new_tokens: response length cap. kv_cache_tokens: KV-cache budget in tokens per rank; a batch
        that would exceed it is split.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    kv_cache_tokens: int = 65536


@dataclass
class OptimizerConfig:
    """Adam(W) through megatron-core's optimizer (distributed when parallel.use_distributed_optimizer).

    initial_loss_scale: model.dtype fp16 only: the starting value of megatron's dynamic loss scale (the
        loss is multiplied by it before backward and the gradients divided by it before the update). A
        step whose gradients overflow is skipped, counted in train/loss_scale_skips (not in
        train/skipped_updates nor by training.max_consecutive_skips); the scale halves at every overflow
        but the first since it last grew (megatron's hysteresis of 2) and doubles after 1000 updates without
        one; it never goes below 1.
        train/loss_scale logs the scale at the end of each step. Default 2^16 (torch's GradScaler's);
        megatron's own default, 2^32, would cost about 17 skipped updates before the first one that counts.
    """

    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    initial_loss_scale: float = 65536.0


@dataclass
class TrainingConfig:
    """The loop.

    prompts_per_step: records per step, global (RL: prompts per rollout batch, each sampled G times; SFT: the
        global batch size). micro_batch_size: sequences per micro-batch (pipeline micro-batches) with
        ``packing: none``.
    packing: how the training passes (old, reference, updates; SFT) lay out their sequences:
        "none" (right-padded micro-batches of micro_batch_size sequences, each prompt repeated for each of its
        responses), "sequences" (whole sequences packed back to back into streams of at most
        max_tokens_per_micro_batch tokens, first-fit by length so micro-batches are balanced; each sequence
        sees only itself and keeps its own M-RoPE positions) or "groups" (RL: a prompt and its responses in one
        stream, [prompt, r_1, ..., r_G]: each response sees its prompt and itself, the prompt runs once per
        group; a group over the budget is split into sub-streams that each carry the prompt). "auto" (default):
        "groups" for RL, "sequences" for SFT, "none" under the Transformer Engine layer spec and under context
        parallelism (set it explicitly there; "groups" is refused under CP). Under the Transformer Engine spec
        "sequences" runs TE's THD path (opt in: never run in CI) and "groups" is refused (no TE mask for a prompt
        shared by its responses); neither packed value with TE and CP.
        Every value gives the same losses and gradients (the normalisers are global); only the cost differs.
    max_tokens_per_micro_batch: token budget of a packed stream (packing "sequences" / "groups"); a single
        sequence (or a prompt with one response) longer than the budget runs alone in its stream.
    seed: torch / megatron random state and the rollouts' sampling generators; the data order is
        data.seed's (an SFT run, which samples nothing, repeats itself under another training.seed).
    train_steps: steps to run (0 = ``epochs`` passes over data.train_files).
    eval_interval: evaluate (greedy, data.eval_files) every N steps (0 = never during training);
        eval_at_start / eval_at_end add evaluations before the first and after the last step.
    max_eval_records: evaluate on the first N records of data.eval_files only (None = all).
    max_consecutive_skips: a step whose loss or gradient is not finite is skipped (no update); this many
        skipped steps in a row stop the run with an error (the last good checkpoint is kept).
    run_dir: metrics.jsonl, wandb / TensorBoard files and (by default) checkpoints go here.
    """

    seed: int = 1234
    prompts_per_step: int = 8
    micro_batch_size: int = 1
    packing: str = "auto"
    max_tokens_per_micro_batch: int = 4096
    train_steps: int = 0
    epochs: int = 1
    eval_interval: int = 0
    eval_at_start: bool = False
    eval_at_end: bool = True
    max_eval_records: Optional[int] = None
    max_consecutive_skips: int = 3
    run_dir: str = "runs/default"


@dataclass
class CheckpointConfig:
    """save_dir: where dist checkpoints go (empty: RUN_DIR/checkpoints); save_interval in steps (0 = only
    at the end); save_final: also save after the last step (false: only every save_interval steps and on
    SIGTERM); keep_last: how many to keep; resume: continue from the newest complete checkpoint in
    save_dir (at any parallel layout); save_on_sigterm: on SIGTERM (SLURM's warning before the time limit)
    save a checkpoint at the end of the current step and exit 0."""

    save_dir: str = ""
    save_interval: int = 0
    save_final: bool = True
    keep_last: int = 2
    resume: bool = True
    save_on_sigterm: bool = True


@dataclass
class LoggingConfig:
    """wandb_mode: "offline" (default, never touches the network), "online" or "disabled"; the WANDB_MODE
    environment variable, when set, wins. tensorboard: also write TensorBoard scalars.
    term_grad_norm_interval: on every N-th RL step, before its last update, one extra forward/backward per
    active loss term (policy, lambda_attn x attention, mu x GKD, gamma_attn x attention distillation) gives
    ``diag/grad_norm/<term>`` and ``diag/grad_ratio/<term>`` (over the policy term's); the update is the
    same as without it. Not with fp16 (its loss scaler); ignored by SFT."""

    wandb_project: str = "megatron_ral"
    wandb_mode: str = "offline"
    run_name: str = ""
    tensorboard: bool = False
    log_interval: int = 1
    progress: bool = True
    term_grad_norm_interval: int = 0   # RL: every N steps, each loss term's gradient norm alone (diag/*); 0 never


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
