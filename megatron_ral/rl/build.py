"""Building what a training run needs from its typed config: model, optimizer, LR schedule, data.

Each builder is a plain function of config sections; ``train.py`` calls them in order. Nothing here
runs a step.

The policy is this rank's Qwen25VLModel stage wrapped in megatron-core's DistributedDataParallel (a
list of chunks, megatron's convention); its weights come from ``model.load`` (a Megatron dist
checkpoint, any layout) or, when that is empty, from ``model.hf_path`` converted once by rank 0 into
``RUN_DIR/initial_mcore`` (the streaming converter). It is never wrapped in megatron's ``Float16Module``:
the parameters are created in the run's dtype directly, and that wrapper would also cast the vision
tower's fp32 rotary buffer to bf16.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ral.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    """"auto" = bf16 with CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def initial_weights(model_cfg, run_dir: str | os.PathLike) -> str:
    """The dist checkpoint the run starts from: ``model.load``, else ``model.hf_path`` converted once (by
    rank 0, into RUN_DIR/initial_mcore; reused by a later run in the same directory). Collective."""
    from megatron_ral.checkpoint.initial_weights import initial_weights_dir

    return str(initial_weights_dir(model_cfg.load, model_cfg.hf_path, Path(run_dir) / "initial_mcore"))


def apply_freezing(model, model_cfg) -> list[str]:
    """requires_grad False for the frozen LM parts (vision is always frozen); returns the frozen names."""
    frozen = []
    layers = set(model_cfg.freeze_lm_layers)
    for name, p in model.named_parameters():
        freeze = False
        if name.startswith("vision_model."):
            freeze = True
        elif model_cfg.freeze_lm_embeddings and "embedding.word_embeddings" in name:
            freeze = True
        elif model_cfg.freeze_lm_embeddings and model.share_embeddings_and_output_weights and "output_layer" in name:
            freeze = True
        elif layers and ".decoder.layers." in name:
            local = int(name.split(".decoder.layers.")[1].split(".")[0])
            global_index = model.language_model.decoder.layers[local].layer_number - 1
            freeze = global_index in layers
        if freeze:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_policy(cfg, parallel, weights: str):
    """(model chunks wrapped in DDP, the unwrapped Qwen25VLModel) with the weights of ``weights``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_ral.checkpoint.model_io import load_model_weights
    from megatron_ral.inference.loading import hf_files_dir
    from megatron_ral.models.qwen25vl.provider import build_model

    overrides = {}
    if cfg.model.recompute_granularity is not None:
        overrides["recompute_granularity"] = cfg.model.recompute_granularity
        if cfg.model.recompute_granularity == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
    dtype = resolve_dtype(cfg.model.dtype)
    model = build_model(str(hf_files_dir(weights)), parallel, backend=cfg.model.layer_spec, dtype=dtype,
                        rope_text_after_vision=cfg.model.rope_text_after_vision,
                        attention_backend=cfg.model.attention_backend, **overrides)
    load_model_weights(model, weights)
    apply_freezing(model, cfg.model)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("model: every parameter of this pipeline stage is frozen (model.freeze_lm_layers / "
                        "model.freeze_lm_embeddings); nothing to train")
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=parallel.use_distributed_optimizer,
        ),
        module=model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return [ddp], model


def total_optimizer_steps(algorithm, train_steps: int) -> int:
    if algorithm.name == "sft":
        return train_steps
    return train_steps * algorithm.updates_per_rollout


def build_optimizer(opt_cfg, model_chunks: list, dtype: torch.dtype, use_distributed_optimizer: bool,
                    total_steps: int):
    """megatron-core Adam(W) (distributed over data-parallel ranks when asked) and its LR schedule.

    fp16: megatron's dynamic loss scaler starts at ``optimizer.initial_loss_scale`` and divides the
    gradients by the scale before the update, so the schedule must multiply the loss by it: the model
    config's ``grad_scale_func`` is set to the optimizer's ``scale_loss`` (the schedule calls it on the
    last stage's loss before backward). bf16 and fp32 need no scaling and get none.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.utils import get_model_config

    fp16 = dtype == torch.float16
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=opt_cfg.lr, min_lr=opt_cfg.min_lr, weight_decay=opt_cfg.weight_decay,
            adam_beta1=opt_cfg.adam_beta1, adam_beta2=opt_cfg.adam_beta2, adam_eps=opt_cfg.adam_eps,
            clip_grad=opt_cfg.clip_grad, bf16=dtype == torch.bfloat16, fp16=fp16,
            initial_loss_scale=opt_cfg.initial_loss_scale,
            params_dtype=dtype, use_distributed_optimizer=use_distributed_optimizer,
        ),
        model_chunks,
    )
    if fp16:
        for chunk in model_chunks:
            get_model_config(chunk).grad_scale_func = optimizer.scale_loss
    steps = max(total_steps, 1)
    warmup = min(opt_cfg.warmup_steps, steps - 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup > 0 else opt_cfg.lr, max_lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr if opt_cfg.lr_schedule != "constant" else opt_cfg.lr,
        lr_warmup_steps=warmup, lr_decay_steps=steps, lr_decay_style=opt_cfg.lr_schedule,
        start_wd=opt_cfg.weight_decay, end_wd=opt_cfg.weight_decay, wd_incr_steps=steps, wd_incr_style="constant",
    )
    return optimizer, scheduler


@dataclass
class DataSetup:
    """The processor and the loaders of a run (this data-parallel rank's shard)."""

    processor: object
    train: object
    eval_cfg: object | None
    per_rank_batch: int


def build_data(cfg, hf_dir: str, dp_rank: int, dp_size: int, loader_state: dict | None = None) -> DataSetup:
    """Training loader (prompt mode for RL, SFT mode for SFT; cycling over epochs) of this DP rank."""
    import dataclasses

    from megatron_ral.data.loader import VisionDataLoader
    from megatron_ral.data.processor import QwenVLProcessor

    if not cfg.data.train_files:
        raise UserError("data.train_files: no training records given")
    for f in list(cfg.data.train_files) + list(cfg.data.eval_files):
        if not Path(f).is_file():
            raise UserError(f"data files: {f} does not exist")
    processor = QwenVLProcessor.from_pretrained(hf_dir)
    per_rank = cfg.training.prompts_per_step // dp_size
    mode = "sft" if cfg.algorithm.name == "sft" else "prompt"
    # the loader only counts failures: the trainer applies the stop rule over every data-parallel rank
    train = VisionDataLoader(cfg.data, processor, list(cfg.data.train_files), rank=dp_rank, world_size=dp_size,
                             batch_size=per_rank, mode=mode, state=loader_state, stop_on_failures=False)
    eval_cfg = None
    if cfg.data.eval_files:
        eval_cfg = dataclasses.replace(cfg.data, shuffle=False, max_records=cfg.training.max_eval_records)
    return DataSetup(processor=processor, train=train, eval_cfg=eval_cfg, per_rank_batch=per_rank)


def eval_loader(data: DataSetup, cfg, dp_rank: int, dp_size: int):
    """A fresh one-epoch loader over data.eval_files for this DP rank (None without eval files)."""
    from megatron_ral.data.loader import VisionDataLoader

    if data.eval_cfg is None:
        return None
    batch = max(1, data.per_rank_batch * (1 if cfg.algorithm.name == "sft" else cfg.algorithm.rollouts_per_prompt))
    return VisionDataLoader(data.eval_cfg, data.processor, list(cfg.data.eval_files), rank=dp_rank, world_size=dp_size,
                            batch_size=batch, mode="prompt", num_epochs=1)


def planned_steps(cfg, records: int) -> int:
    """training.train_steps, or enough steps for training.epochs passes over ``records`` records."""
    if cfg.training.train_steps > 0:
        return cfg.training.train_steps
    return max(1, math.ceil(cfg.training.epochs * records / cfg.training.prompts_per_step))
