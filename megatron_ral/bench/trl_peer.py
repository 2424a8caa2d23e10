"""TRL's ``GRPOTrainer``, set up as the peer of this package's GRPO step (benchmarks and loss checks only).

TRL is not a dependency of the package: it comes with the ``[bench]`` extra
(``pip install -e ".[bench]"``) and only ``tools/bench/vs_trl.py`` and its test import it, through
:func:`require_trl`. Everything here maps one of our settings to TRL's, so that both sides run the same
thing:

    ours                                         TRL GRPOConfig / GRPOTrainer
    algorithm.rollouts_per_prompt G              num_generations
    training.prompts_per_step P                  per_device_train_batch_size x steps_per_generation = P x G
    algorithm.updates_per_rollout / epochs       steps_per_generation (mini-batches), num_iterations (epochs)
    algorithm.clip_eps / clip_eps_high           epsilon / epsilon_high
    algorithm.kl_beta                            beta (k3 estimator on both sides); use_bias_correction_kl=False
                                                 (TRL 1.16's default multiplies the KL term by the ratio)
    algorithm.loss_aggregation                   loss_type (see LOSS_TYPES)
    algorithm.adv_eps                            1e-4 fixed in TRL (scale_rewards="group", unbiased std)
    generation.temperature / top_p / top_k       temperature / top_p / top_k (log-probs of softmax(logits / T))
    generation.max_new_tokens                    max_completion_length
    optimizer lr / clip_grad, constant schedule  learning_rate / max_grad_norm, lr_scheduler_type="constant"
    vision tower frozen (model.freeze_vision)    the HF policy's ``model.visual`` frozen before it is handed over

The prompts are the same chat messages (``data.prompts.user_messages``: the image, then the question
with its options, instruction and answer suffix) with the image as TRL's ``image`` column, and the
reward is this package's Video-R1 reward (``rl.rewards.score``) on TRL's decoded completions.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ral.errors import UserError

# TRL version the comparison was written and measured against (the [bench] extra pins it).
TRL_VERSION = "1.16.0"

# Our loss_aggregation -> the TRL loss types that compute the same mini-batch loss when an optimizer step
# sees the whole mini-batch at once (TRL: gradient_accumulation_steps=1, as here):
#   grpo     mean over sequences of each sequence's token mean        = seq_mean_token_mean
#   bnpo     token mean over the per-device batch (= the mini-batch)    = token_mean
#   dapo     token sum / (generation-batch tokens / steps_per_generation): = token_mean with one mini-batch
#            per rollout batch (the loss check); with several, TRL divides by their mean token count, ours by
#            each mini-batch's own
#   dr_grpo  token sum / (sequences x max_completion_length)           = seq_mean_token_sum_norm
LOSS_TYPES = {
    "seq_mean_token_mean": ("grpo",),
    "token_mean": ("bnpo", "dapo"),
    "seq_mean_token_sum_norm": ("dr_grpo",),
}

# Launcher variables a megatron bring-up exports (world size 1 here); accelerate would read them as a
# multi-process CPU launch.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class TRLNotInstalled(UserError):
    """TRL (the [bench] extra) is not importable."""


def require_trl():
    """The ``trl`` module, or TRLNotInstalled with the install command."""
    try:
        import trl
    except ImportError as e:
        raise TRLNotInstalled(
            f"TRL is not installed ({e}); it is only needed for this comparison: "
            f"pip install -e '.[bench]' (trl=={TRL_VERSION})") from None
    return trl


@dataclass(frozen=True)
class GRPOSettings:
    """The GRPO step both sides run (one rollout batch = P prompts x G responses)."""

    prompts_per_step: int = 4
    group_size: int = 8
    updates_per_rollout: int = 2
    epochs_per_rollout: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    kl_beta: float = 0.04
    clip_eps: float = 0.2
    lr: float = 1e-5
    clip_grad: float = 1.0
    loss_aggregation: str = "seq_mean_token_mean"
    adv_eps: float = 1e-4              # TRL's fixed value
    template: str = "think"
    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    seed: int = 0

    @property
    def minibatches(self) -> int:
        return self.updates_per_rollout // self.epochs_per_rollout

    @property
    def sequences_per_minibatch(self) -> int:
        return self.prompts_per_step * self.group_size // self.minibatches

    def check(self) -> None:
        if self.updates_per_rollout % self.epochs_per_rollout:
            raise UserError("--updates must be a multiple of --epochs (mini-batches x epochs)")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise UserError(f"prompts x G = {self.prompts_per_step * self.group_size} sequences do not split into "
                            f"{self.minibatches} equal mini-batches (TRL needs equal ones)")
        if self.loss_aggregation not in LOSS_TYPES:
            raise UserError(f"--loss-aggregation: one of {sorted(LOSS_TYPES)}, got {self.loss_aggregation!r}")


@contextlib.contextmanager
def single_process_env():
    """Hide the launcher variables while TRL / accelerate objects are built: accelerate then sees one
    plain CPU process (what it is) even after a megatron bring-up exported RANK=0, WORLD_SIZE=1."""
    saved = {k: os.environ.pop(k) for k in _LAUNCH_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def image_pixel_limits(hf_dir: str | os.PathLike) -> tuple[int, int]:
    """(min_pixels, max_pixels) of the checkpoint's image processor: our data config uses the same, so
    both sides resize every image to the same grid."""
    cfg = json.loads((Path(hf_dir) / "preprocessor_config.json").read_text())
    size = cfg.get("size") or {}
    lo = size.get("shortest_edge", cfg.get("min_pixels"))
    hi = size.get("longest_edge", cfg.get("max_pixels"))
    if lo is None or hi is None:
        raise UserError(f"{hf_dir}/preprocessor_config.json: no image pixel limits (size.shortest_edge/longest_edge)")
    return int(lo), int(hi)


def read_records(path: str) -> list:
    """The Video-R1 records of a JSON / JSON-lines file, validated as the loader does."""
    from megatron_ral.data.records import RecordIndex

    index = RecordIndex.build([path])
    try:
        return [index.read(i) for i in range(len(index))]
    finally:
        index.close()


def record_json(record) -> str:
    """The fields the reward reads, as one JSON string column (Arrow keeps it as it is)."""
    return json.dumps({"problem_id": record.problem_id, "problem_type": record.problem_type,
                       "solution": record.solution, "options": list(record.options), "source": record.source})


def trl_rows(records: list, media_root: str, template: str = "think", system_prompt: str | None = None) -> list[dict]:
    """One TRL example per image record: the conversational ``prompt`` our loader renders, the PIL
    ``image`` and the ``record`` JSON for the reward."""
    from PIL import Image

    from megatron_ral.data.image import to_rgb
    from megatron_ral.data.prompts import get_template, user_messages

    tpl = get_template(template)
    rows = []
    for r in records:
        if r.data_type != "image":
            raise UserError(f"{r.source}: TRL's GRPOTrainer takes images, not videos (data_type {r.data_type!r})")
        with Image.open(r.media_path(media_root)) as im:
            image = to_rgb(im)
        rows.append({"prompt": user_messages(r, tpl, system_prompt), "image": image, "record": record_json(r)})
    return rows


def video_r1_reward(template: str, accuracy_weight: float, format_weight: float):
    """This package's reward (``rl.rewards.score``) as a TRL reward function: one float per completion."""
    from megatron_ral.rl.rewards import score

    def video_r1(prompts, completions, record, **_):
        out = []
        for completion, rec in zip(completions, record):
            text = completion[0]["content"] if isinstance(completion, list) else completion
            out.append(score(text, json.loads(rec), template, accuracy_weight, format_weight).total)
        return out

    return video_r1


def load_hf_policy(hf_dir: str, freeze_vision: bool = True, attn_implementation: str = "sdpa"):
    """The HF Qwen2.5-VL policy in fp32 (transformers' default attention on CPU, sdpa), with the vision
    tower and merger frozen like ours (``model.freeze_vision``). TRL builds its reference model the same
    way (same dtype and attention implementation)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                               attn_implementation=attn_implementation)
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    return model


def our_config(s: GRPOSettings, mcore_dir: str, records_file: str, media_root: str, micro_batch_size: int,
               run_dir: str = "runs/vs_trl", hf_dir: str | None = None):
    """Our run configuration for the settings (GRPO, fp32, one process, loader in-process, file order)."""
    from megatron_ral.config import load_config
    from megatron_ral.inference.loading import hf_files_dir

    lo, hi = image_pixel_limits(hf_dir or hf_files_dir(mcore_dir))
    return load_config(None, [
        f"model.load={mcore_dir}", "model.dtype=fp32", "model.layer_spec=local",
        f"data.train_files=[{records_file}]", f"data.media_root={media_root}", "data.num_workers=0",
        "data.shuffle=false", f"data.image_min_pixels={lo}", f"data.image_max_pixels={hi}", f"data.template={s.template}",
        "algorithm.name=grpo", f"algorithm.rollouts_per_prompt={s.group_size}",
        f"algorithm.updates_per_rollout={s.updates_per_rollout}", f"algorithm.epochs_per_rollout={s.epochs_per_rollout}",
        f"algorithm.loss_aggregation={s.loss_aggregation}", f"algorithm.clip_eps={s.clip_eps}",
        f"algorithm.kl_beta={s.kl_beta}", "algorithm.lambda_attn=0", f"algorithm.adv_eps={s.adv_eps}",
        f"algorithm.reward_accuracy_weight={s.accuracy_weight}", f"algorithm.reward_format_weight={s.format_weight}",
        f"generation.temperature={s.temperature}", f"generation.top_p={s.top_p}", f"generation.top_k={s.top_k}",
        f"generation.max_new_tokens={s.max_new_tokens}",
        f"optimizer.lr={s.lr}", f"optimizer.clip_grad={s.clip_grad}", "optimizer.lr_schedule=constant",
        "optimizer.weight_decay=0", f"training.seed={s.seed}",
        f"training.prompts_per_step={s.prompts_per_step}", f"training.micro_batch_size={micro_batch_size}",
        f"training.run_dir={run_dir}", "training.eval_at_end=false",
        "logging.wandb_mode=disabled", "logging.progress=false",
    ])


def grpo_config(s: GRPOSettings, output_dir: str, max_steps: int, loss_type: str | None = None, **overrides):
    """TRL's GRPOConfig for the settings: one CPU process, fp32, HF generate (no vLLM), no gradient
    checkpointing (TRL's default; ours recomputes nothing either), the plain k3 KL term of the GRPO paper
    (not TRL 1.16's default ratio-weighted one), no logging, saving or shuffling."""
    from trl import GRPOConfig

    types = LOSS_TYPES[s.loss_aggregation]
    if loss_type is None:
        loss_type = types[0]
    elif loss_type not in types:
        raise ValueError(f"loss_type {loss_type!r} does not compute {s.loss_aggregation} (expected one of {types})")
    args = dict(
        output_dir=output_dir, use_cpu=True, bf16=False, fp16=False, use_vllm=False,
        per_device_train_batch_size=s.sequences_per_minibatch, gradient_accumulation_steps=1,
        steps_per_generation=s.minibatches, num_iterations=s.epochs_per_rollout, num_generations=s.group_size,
        max_completion_length=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        beta=s.kl_beta, epsilon=s.clip_eps, loss_type=loss_type, scale_rewards="group",
        use_bias_correction_kl=False,
        learning_rate=s.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=s.clip_grad,
        max_steps=max_steps, gradient_checkpointing=False, shuffle_dataset=False, dataloader_num_workers=0,
        report_to="none", save_strategy="no", logging_steps=1_000_000, disable_tqdm=True, log_completions=False,
        seed=s.seed,
    )
    args.update(overrides)
    return GRPOConfig(**args)


def build_trainer(model, s: GRPOSettings, rows: list[dict], output_dir: str, max_steps: int,
                  loss_type: str | None = None, trainer_cls=None, suppress_token_ids: list[int] | None = None,
                  **trainer_kwargs):
    """A GRPOTrainer over ``rows`` with this package's reward. ``suppress_token_ids`` are never sampled
    (default: the image and video placeholders, as in our rollouts). TRL loads its processor itself
    (left padding, the padding side its batches assume)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    if suppress_token_ids is None:
        suppress_token_ids = [model.config.image_token_id, model.config.video_token_id]
    args = grpo_config(s, output_dir, max_steps, loss_type, generation_kwargs={"suppress_tokens": suppress_token_ids})
    cls = trainer_cls or GRPOTrainer
    with single_process_env():
        trainer = cls(model=model, reward_funcs=video_r1_reward(s.template, s.accuracy_weight, s.format_weight),
                      args=args, train_dataset=Dataset.from_list(rows), **trainer_kwargs)
    if trainer.accelerator.num_processes != 1:
        raise RuntimeError(f"TRL sees {trainer.accelerator.num_processes} processes; the comparison runs one")
    return trainer
